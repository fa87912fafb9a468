"""sdrt.pipelines.rng against what it imitates: torch's CPU randn (live, bit for bit), CUDA randn (published values)."""
from __future__ import annotations

import ast
import time
from pathlib import Path

import numpy as np
import pytest

from sdrt.errors import InvalidRequest
from sdrt.pipelines import rng
from sdrt.pipelines.rng import NumpyGenerator, PhiloxGenerator, TorchCPUGenerator, make_generator

SEEDS = [0, 1, 42, 2 ** 32 + 5, 4294967295]
SHAPES = [(1,), (3,), (15,), (16,), (17,), (1, 4, 8, 8), (2, 4, 9, 7), (1, 4, 64, 64), (5, 33)]


def _torch():
    return pytest.importorskip("torch")


def assert_like_torch(got: np.ndarray, want: np.ndarray) -> None:
    """Bit-exact on x86 torch builds with AVX2/AVX512 kernels; elsewhere torch itself uses libm (<~2e-6 apart)."""
    assert got.dtype == np.float32 and got.shape == want.shape
    if _torch().backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or got.size < 16:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_matches_torch_randn(seed, shape):
    torch = _torch()
    want = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    assert_like_torch(TorchCPUGenerator(seed).randn(shape), want.numpy())


@pytest.mark.parametrize("seed", [0, 42, 2 ** 63 + 11])
def test_cpu_continues_the_stream_across_calls(seed):
    # Mixed sizes: the scalar path's cached second normal must survive the vectorized calls in between.
    torch = _torch()
    shapes = [(3,), (1, 4, 8, 8), (1, 4, 8, 8), (5,), (1,), (17,), (2,), (16,), (7,), (2, 4, 9, 7), (1,)]
    theirs, ours = torch.Generator("cpu").manual_seed(seed), TorchCPUGenerator(seed)
    for shape in shapes:
        assert_like_torch(ours.randn(shape), torch.randn(shape, generator=theirs).numpy())


def test_cpu_draw_is_fast():
    g = TorchCPUGenerator(7)
    g.randn((1, 4, 8, 8))
    start = time.perf_counter()
    noise = g.randn((1, 4, 128, 128))
    assert time.perf_counter() - start < 0.5
    assert noise.shape == (1, 4, 128, 128) and abs(float(noise.std()) - 1) < 0.02


# Real CUDA output of torch.manual_seed(0); torch.randn((8, 10), device="cuda") (libtorch, sm_75), printed to 4
# decimals in the README of github.com/kapilsh/cuda-mode-lecture ("Tensor x: [ CUDAFloatType{8,10} ]"); its first
# 64 values also appear there as the Python randn((8, 8), device="cuda") after manual_seed(0).
CUDA_SEED0_8x10 = [
    -0.9247, -0.4253, -2.6438, 0.1452, -0.1209, -0.5797, -0.6229, -0.3284, -1.0745, -0.3631,
    -1.6711, 2.2655, 0.3117, -0.1842, 1.2866, 1.1820, -0.1271, 1.2169, 1.4353, 1.0605,
    -0.4941, -1.4244, -0.7244, -1.2973, 0.0697, -0.0074, 1.8969, 0.6878, -0.0779, -0.8373,
    1.3506, -0.2879, -0.5965, -0.3283, -0.9086, -0.8059, -0.7407, -0.0504, 0.5435, 1.5150,
    0.0141, 0.4532, 1.6349, 0.7124, -0.1806, 1.0252, -1.4622, -0.7554, -0.1836, 0.3824,
    0.3918, -0.0830, 0.8971, -1.1123, 0.1116, 0.4863, -0.5499, -0.3231, -0.5469, 0.9049,
    0.2837, 0.1210, 0.4730, -1.0823, -0.0334, -0.9734, 0.9559, -1.1795, -1.0064, 0.1160,
    0.6852, -0.4124, -0.6738, -0.5404, 0.6898, -1.5517, 0.3805, -0.0436, 0.3597, -0.5043,
]

# Expected output for Generator(seed=0).randn(shape=(3, 4)) in the docstring of AUTOMATIC1111's
# modules/rng_philox.py (github.com/AUTOMATIC1111/stable-diffusion-webui), 8 decimals: the CUDA values.
A1111_DOCSTRING_SEED0_3x4 = [
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]

# torch.randn([1, 64, 2048], generator=torch.Generator("cuda").manual_seed(42), device="cuda") from
# github.com/pytorch/pytorch/issues/158398 (CUDA 12.6): first three rows, first and last three columns.
CUDA_SEED42_1x64x2048_ROWS = {
    0: [0.1940, 2.1614, -0.1721, 1.4540, -2.7733, -0.8932],
    1: [-0.4574, 0.8063, 0.1580, 0.1124, 0.2769, -1.2535],
    2: [1.1346, -0.6329, -0.9147, -1.0001, -1.1552, -0.6955],
}


def test_philox_matches_published_cuda_values():
    np.testing.assert_allclose(PhiloxGenerator(0).randn((8, 10)).ravel(), CUDA_SEED0_8x10, rtol=0, atol=6e-5)
    # A1111's float64 Box-Muller lands within 3e-7 of the docstring's CUDA values; so do we.
    np.testing.assert_allclose(PhiloxGenerator(0).randn((3, 4)), A1111_DOCSTRING_SEED0_3x4, rtol=0, atol=1e-6)
    noise = PhiloxGenerator(42).randn((1, 64, 2048))[0]
    for row, want in CUDA_SEED42_1x64x2048_ROWS.items():
        np.testing.assert_allclose(noise[row, [0, 1, 2, -3, -2, -1]], want, rtol=0, atol=6e-5)


def test_philox_is_indexed_and_advances_per_call():
    g = PhiloxGenerator(2 ** 64 - 1)
    first = g.randn((2, 4, 9, 7))
    assert first.dtype == np.float32 and first.shape == (2, 4, 9, 7)
    np.testing.assert_array_equal(PhiloxGenerator(2 ** 64 - 1).randn((5,)), first.ravel()[:5])
    second = g.randn((2, 4, 9, 7))
    assert not np.array_equal(first, second)       # A1111 bumps the counter's offset word per call
    start = time.perf_counter()
    PhiloxGenerator(3).randn((1, 4, 128, 128))
    assert time.perf_counter() - start < 0.5


def test_numpy_generator_is_default_rng_stream():
    ref = np.random.default_rng(123)
    g = NumpyGenerator(123)
    for shape in [(3,), (1, 4, 8, 8), (17,)]:
        np.testing.assert_array_equal(g.randn(shape), ref.standard_normal(shape, dtype=np.float32))


def test_make_generator_kinds_and_errors():
    assert isinstance(make_generator("cpu", 1), TorchCPUGenerator)
    assert isinstance(make_generator("nv", 1), PhiloxGenerator)
    assert isinstance(make_generator("numpy", 1), NumpyGenerator)
    for kind in ("cpu", "nv", "numpy"):
        assert isinstance(make_generator(kind, 0), rng.Generator)
        assert make_generator(kind, 2 ** 64 - 1).randn((2, 3)).shape == (2, 3)
    with pytest.raises(InvalidRequest, match="cpu, numpy, nv"):
        make_generator("cuda", 1)


@pytest.mark.parametrize("seed", [-1, 2 ** 64, 1.5, "7", True])
def test_bad_seeds_are_invalid_requests(seed):
    for kind in ("cpu", "nv", "numpy"):
        with pytest.raises(InvalidRequest, match="seed"):
            make_generator(kind, seed)


def test_module_never_imports_torch():
    tree = ast.parse(Path(rng.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "torch" not in imported
