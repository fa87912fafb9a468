"""``python -m sdrt.benchmark OUT [options]``: the same as ``sdrt bench OUT [options]``."""
import sys

from ..cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    verbose = [a for a in argv if a in ("-v", "--verbose")]
    sys.exit(main([*verbose, "bench", *(a for a in argv if a not in verbose)]))
