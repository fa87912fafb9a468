"""How much the NumPy pipeline adds around the runtime's component calls.

    python bench/loop_overhead.py OUT [--size 256] [--steps 20] [--runs 3] [--threads 2]

overhead = end-to-end time - time spent inside the runtime's ``run`` calls (text encoder, UNet, VAE),
reported as a percentage of the component time. Median over ``--runs`` runs after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics

import sdrt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sampler", default="Euler a")
    args = p.parse_args()
    pipe = sdrt.load(args.model, threads=args.threads, progress=False)
    rows = []
    for run in range(args.runs + 1):
        r = pipe.txt2img("a photograph of an astronaut riding a horse", width=args.size, height=args.size,
                         steps=args.steps, sampler=args.sampler, guidance_scale=7.5, seed=run)
        inside = sum(v for k, v in r.timings.items() if k != "total")
        if run:                                           # run 0 is the warm-up
            rows.append({"total": r.timings["total"], "components": inside,
                         "overhead": r.timings["total"] - inside, **r.timings})
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    med["overhead_percent"] = 100.0 * med["overhead"] / med["components"]
    print(json.dumps({"size": args.size, "steps": args.steps, "sampler": args.sampler,
                      "threads": args.threads, "runs": args.runs, "median": med}, indent=2))


if __name__ == "__main__":
    main()
