"""The one interface every backend implements, and the checks done at its boundary."""
from __future__ import annotations

import time
from typing import Mapping, Protocol

import numpy as np

from ..errors import InvalidRequest
from ..specs import ComponentSpec


class Runtime(Protocol):
    """A compiled component: feed named arrays, get named arrays. Pipelines only ever see this."""
    spec: ComponentSpec

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def check_feeds(spec: ComponentSpec, feeds: Mapping[str, np.ndarray]) -> None:
    """Name and rank check at the runtime boundary; shapes beyond rank are the backend's to judge."""
    expected = {t.name: t for t in spec.inputs}
    if set(feeds) != set(expected):
        raise InvalidRequest(f"{spec.name}: inputs {sorted(feeds)} do not match the graph's {sorted(expected)}")
    for name, t in expected.items():
        if np.ndim(feeds[name]) != len(t.shape):
            raise InvalidRequest(f"{spec.name}: '{name}' has shape {np.shape(feeds[name])}, "
                                 f"expected rank {len(t.shape)} {t.shape}")


# what the backends say when an allocation fails (ONNX Runtime, OpenVINO's std::bad_alloc, CUDA)
OUT_OF_MEMORY = ("bad_alloc", "failed to allocate", "cannot allocate", "out of memory")


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(words in str(e).lower() for words in OUT_OF_MEMORY)


class Timed:
    """Wraps a Runtime and accumulates the wall time spent inside its ``run`` calls; a backend's failed
    allocation becomes a MemoryError naming the component (a request too large for this machine, not a bug)."""

    def __init__(self, inner: Runtime):
        self.inner, self.spec = inner, inner.spec
        self.seconds, self.calls = 0.0, 0

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        try:
            return self.inner.run(feeds)
        except Exception as e:
            if isinstance(e, MemoryError) or not out_of_memory(e):
                raise
            raise MemoryError(f"{self.spec.name}: {str(e).strip().splitlines()[0][:300]}") from None
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1
