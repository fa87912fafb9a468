"""Seeded Gaussian noise that reproduces torch's generators with NumPy alone (never imports torch).

Three sources, chosen by ``make_generator(kind, seed)``:

* ``"cpu"``   -- ``TorchCPUGenerator``: the stream of ``torch.randn(shape, generator=torch.Generator("cpu")
  .manual_seed(seed))`` in float32, bit for bit, including successive calls on one generator. It follows
  ATen's CPU kernel: an MT19937 engine seeded with ``init_genrand(seed & 0xffffffff)``; tensors of 16 or
  more elements use ``normal_fill`` (24-bit uniform floats, Box-Muller in blocks of 16, the last 16
  recomputed from fresh uniforms when the size is not a multiple of 16) through the x86 AVX2/AVX512 kernel
  ``normal_fill_16_AVX2`` (Cephes ``log256_ps``/``sincos256_ps`` from ``avx_mathfun.h``, with the FMA
  contractions GCC applies); smaller tensors use the scalar ``normal_distribution<double>`` (53-bit
  uniforms from ``random64``, ``log1p``, a cached second value that survives across calls). Torch built
  without AVX2 (ARM, ``ATEN_CPU_CAPABILITY=default``) uses libm float functions instead and differs from
  this by at most a few 1e-6 (2.3e-6 measured).
* ``"nv"``    -- ``PhiloxGenerator``: torch's CUDA ``randn`` as AUTOMATIC1111's "NV" source imitates it
  (Philox4x32-10 keyed by the seed, counter ``(call, 0, index, 0)``, curand-style Box-Muller in float64),
  bit for bit with A1111's ``modules/rng_philox.py``; within 3e-7 of real CUDA output as long as the
  tensor has no more elements than the GPU launches threads (beyond that CUDA's layout is per-GPU anyway).
* ``"numpy"`` -- ``NumpyGenerator``: ``np.random.default_rng(seed).standard_normal(..., dtype=float32)``.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import InvalidRequest

SEED_LIMIT = 2 ** 64


@runtime_checkable
class Generator(Protocol):
    """Anything that draws standard-normal float32 noise of a given shape, advancing its own stream."""

    def randn(self, shape: int | Iterable[int]) -> np.ndarray: ...


def check_seed(seed: int) -> int:
    """Return ``seed`` as an int if torch's ``manual_seed`` would take it unchanged (0 <= seed < 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidRequest(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise InvalidRequest(f"seed must be in [0, 2**64), got {seed}; pick a non-negative 64-bit seed")
    return seed


def _shape(shape: int | Iterable[int]) -> tuple[int, ...]:
    """Normalize an int or an iterable of ints (numpy ints included) to a tuple of non-negative ints."""
    dims = (operator.index(shape),) if not isinstance(shape, Iterable) else tuple(map(operator.index, shape))
    if any(d < 0 for d in dims):
        raise InvalidRequest(f"noise shape must have non-negative sizes, got {dims}")
    return dims


# ---------------------------------------------------------------- torch CPU: MT19937 + normal_fill

def _mt19937(seed: int) -> np.random.MT19937:
    """An MT19937 bit generator in the state of ``init_genrand(seed & 0xffffffff)`` (torch's ``mt19937``)."""
    key = np.empty(624, dtype=np.uint32)
    s = seed & 0xFFFFFFFF
    for i in range(624):
        key[i] = s
        s = (1812433253 * (s ^ (s >> 30)) + i + 1) & 0xFFFFFFFF
    bits = np.random.MT19937(0)
    bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}
    return bits


_F32 = np.float32
_MIDPOINT_BITS, _LOW_BITS = np.uint64(1 << 28), np.uint64((1 << 29) - 1)


def _fma(a: np.ndarray, b, c) -> np.ndarray:
    """Single-rounding float32 ``a*b + c`` (the FMA GCC contracts into avx_mathfun), without double rounding."""
    p = a.astype(np.float64) * np.asarray(b, dtype=np.float64)   # exact: 24 x 24 bits fit in a double
    c = np.asarray(c, dtype=np.float64)
    s = p + c
    bp = s - p
    err = (p - (s - bp)) + (c - bp)                    # TwoSum: s + err == p + c exactly
    tie = ((s.view(np.uint64) & _LOW_BITS) == _MIDPOINT_BITS) & (err != 0)
    if tie.any():                                      # s sits on a float32 midpoint: break it by err's sign
        s = np.where(tie, np.nextafter(s, np.copysign(np.inf, err)), s)
    return s.astype(np.float32)


_LOG_P = [_F32(v) for v in (7.0376836292E-2, -1.1514610310E-1, 1.1676998740E-1, -1.2420140846E-1,
                             1.4249322787E-1, -1.6668057665E-1, 2.0000714765E-1, -2.4999993993E-1,
                             3.3333331174E-1)]


def _log256(x: np.ndarray) -> np.ndarray:
    """``log256_ps`` of avx_mathfun.h (Cephes logf) on positive normal float32, FMA-contracted like GCC."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 0x7F).astype(np.float32) + _F32(1)
    m = ((bits & ~0x7F800000) | 0x3F000000).view(np.float32)       # mantissa in [0.5, 1)
    small = m < _F32(0.707106781186547524)
    e = e - small.astype(np.float32)
    m = (m - _F32(1)) + np.where(small, m, _F32(0))
    z = m * m
    y = np.full_like(m, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = _fma(y, m, p)
    y = _fma(y * m, z, e * _F32(-2.12194440e-4))
    y = _fma(z, _F32(-0.5), y)
    return (m + y) + e * _F32(0.693359375)


def _sincos256(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sincos256_ps`` of avx_mathfun.h (Cephes sinf/cosf) on non-negative float32, FMA-contracted like GCC."""
    j = ((x * _F32(1.27323954473516)).astype(np.int32) + 1) & ~1   # octant, rounded up to even
    y = j.astype(np.float32)
    for dp in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8):
        x = _fma(y, _F32(dp), x)                                     # extended-precision x - j*pi/4
    z = x * x
    yc = _fma(np.full_like(z, _F32(2.443315711809948E-005)), z, _F32(-1.388731625493765E-003))
    yc = _fma(yc, z, _F32(4.166664568298827E-002))
    yc = _fma(yc * z, z, -(z * _F32(0.5))) + _F32(1)
    ys = _fma(np.full_like(z, _F32(-1.9515295891E-4)), z, _F32(8.3321608736E-3))
    ys = _fma(ys, z, _F32(-1.6666654611E-1))
    ys = _fma(ys * z, x, x)
    swap = (j & 2) != 0
    sin, cos = np.where(swap, yc, ys), np.where(swap, ys, yc)
    sin = (sin.view(np.int32) ^ ((j & 4) << 29)).view(np.float32)
    cos = (cos.view(np.int32) ^ ((~(j - 2) & 4) << 29)).view(np.float32)
    return sin, cos


def _normal_fill_16(u: np.ndarray) -> np.ndarray:
    """``normal_fill_16_AVX2`` on each block of 16 uniforms: Box-Muller of u[:8] (radius) and u[8:] (angle)."""
    blocks = u.reshape(-1, 16)
    radius = np.sqrt(_F32(-2) * _log256(_F32(1) - blocks[:, :8]))
    sin, cos = _sincos256(_F32(2 * math.pi) * blocks[:, 8:])
    return np.concatenate([radius * cos, radius * sin], axis=1).ravel()


class TorchCPUGenerator:
    """Reproduces ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`` (float32)."""

    def __init__(self, seed: int):
        self.seed = check_seed(seed)
        self._bits = _mt19937(self.seed)
        self._cached: float | None = None   # CPUGeneratorImpl::next_double_normal_sample_

    def _uint32(self, n: int) -> np.ndarray:
        return self._bits.random_raw(n).astype(np.uint32)

    def _uniform24(self, n: int) -> np.ndarray:
        """``uniform_real_distribution<float>(0, 1)``: 24 low bits of one 32-bit draw, times 2**-24."""
        return (self._uint32(n) & 0xFFFFFF).astype(np.float32) * _F32(2.0 ** -24)

    def _uniform53(self) -> float:
        """``uniform_real_distribution<double>(0, 1)``: 53 low bits of ``random64`` (first draw high), times 2**-53."""
        hi, lo = (int(v) for v in self._uint32(2))
        return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0 ** -53

    def _normal_double(self) -> float:
        """``normal_distribution<double>``: Box-Muller returning cos, caching sin for the next scalar draw."""
        if self._cached is not None:
            value, self._cached = self._cached, None
            return value
        u1 = self._uniform53()
        u2 = self._uniform53()
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached = r * math.sin(theta)
        return r * math.cos(theta)

    def randn(self, shape: int | Iterable[int]) -> np.ndarray:
        """Next ``shape`` values of the stream, as ATen's ``normal_kernel`` draws them for a contiguous float32."""
        dims = _shape(shape)
        n = math.prod(dims)
        if n < 16:
            return np.array([self._normal_double() for _ in range(n)], dtype=np.float32).reshape(dims)
        out = np.empty(n, dtype=np.float32)
        full = n - n % 16
        out[:full] = _normal_fill_16(self._uniform24(n)[:full])
        if full != n:                        # torch redraws 16 uniforms and recomputes the last 16 values
            out[n - 16:] = _normal_fill_16(self._uniform24(16))
        return out.reshape(dims)


# ---------------------------------------------------------------- torch CUDA as A1111 "NV": Philox4x32-10

_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U32 = np.uint64(0xFFFFFFFF)
_TWO_POW32_INV = float(np.float32(2.3283064e-10))                     # 2**-32, as A1111 spells it
_TWO_POW32_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))     # 2*pi / 2**32 rounded to float32


def _philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Ten Philox4x32 rounds over uint64 arrays holding 32-bit counter words; returns the 4 output words."""
    for r in range(10):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & 0xFFFFFFFF, (k1 + _PHILOX_W[1]) & 0xFFFFFFFF
        p0, p1 = c0 * _PHILOX_M[0], c2 * _PHILOX_M[1]
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ np.uint64(k0), p1 & _U32, (p0 >> 32) ^ c3 ^ np.uint64(k1), p0 & _U32
    return c0, c1, c2, c3


class PhiloxGenerator:
    """Reproduces CUDA ``torch.randn(shape, generator=torch.Generator("cuda").manual_seed(seed))`` like A1111's NV."""

    def __init__(self, seed: int):
        self.seed = check_seed(seed)
        self.offset = 0                      # A1111 advances the counter's first word by one per call

    def randn(self, shape: int | Iterable[int]) -> np.ndarray:
        """Next ``shape`` values: element i is the curand Box-Muller sine of Philox((offset, 0, i, 0), seed)."""
        dims = _shape(shape)
        n = math.prod(dims)
        index = np.arange(n, dtype=np.uint64)
        zeros = np.zeros(n, dtype=np.uint64)
        x, y, _, _ = _philox4x32_10(zeros + np.uint64(self.offset & 0xFFFFFFFF), zeros, index, zeros,
                                    self.seed & 0xFFFFFFFF, self.seed >> 32)
        self.offset += 1
        u = x.astype(np.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2
        v = y.astype(np.float64) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
        return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32).reshape(dims)


# ---------------------------------------------------------------- numpy

class NumpyGenerator:
    """The stream of ``np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)``."""

    def __init__(self, seed: int):
        self.seed = check_seed(seed)
        self._rng = np.random.default_rng(self.seed)

    def randn(self, shape: int | Iterable[int]) -> np.ndarray:
        """Next ``shape`` standard normals from numpy's PCG64 + ziggurat, float32."""
        return self._rng.standard_normal(_shape(shape), dtype=np.float32)


GENERATORS = {"cpu": TorchCPUGenerator, "nv": PhiloxGenerator, "numpy": NumpyGenerator}


def make_generator(kind: str, seed: int) -> Generator:
    """A fresh noise generator of ``kind`` ("cpu", "nv" or "numpy") seeded with ``seed``."""
    if kind not in GENERATORS:
        raise InvalidRequest(f"unknown rng {kind!r}; valid kinds: {', '.join(sorted(GENERATORS))}")
    return GENERATORS[kind](seed)
