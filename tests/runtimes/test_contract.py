"""The ``Runtime`` contract, for every backend installed here: names and ranks checked at the boundary, and
outputs with the spec's names and shapes. Absent backends skip."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from sdrt import manifest as mf
from sdrt.errors import InvalidRequest
from sdrt.runtimes import BACKENDS
from sdrt.specs import SPECS, spec_for

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    if request.param == "tensorrt":
        pytest.skip("TensorRT runs engines built for production profiles: tests/runtimes/test_tensorrt.py (gpu)")
    module = importlib.import_module(f"sdrt.runtimes.{request.param}")
    if not module.available():
        pytest.skip(f"{request.param} is not installed")
    return module


@pytest.fixture(scope="module")
def export(tiny_export):
    return tiny_export, mf.read(tiny_export)


def dims(arch: dict) -> dict[str, int]:
    """Sizes unlike the export's trace sizes: batch 3, 48x40 pixels."""
    return dict(B=3, H=40, W=48, S=77, D=arch["cross_attention_dim"], C=arch["latent_channels"],
                CI=arch["unet_in_channels"], L=arch["text_layers"] + 1, V=1000)


@pytest.mark.parametrize("component", COMPONENTS)
def test_outputs_have_the_spec_names_and_shapes(backend, export, component):
    folder, manifest = export
    spec = spec_for(manifest.components[component], manifest.architecture)
    runtime = backend.load(folder / manifest.components[component].file, spec)
    assert runtime.spec == spec
    sizes = dims(manifest.architecture)
    out = runtime.run(spec.sample(np.random.default_rng(0), **sizes))
    assert list(out) == [t.name for t in spec.outputs]
    for t in spec.outputs:
        assert isinstance(out[t.name], np.ndarray) and out[t.name].dtype == np.float32
        assert out[t.name].shape == t.resolve(sizes), t.name


def test_inputs_are_checked_at_the_boundary(backend, export):
    folder, manifest = export
    spec = SPECS["unet"]
    runtime = backend.load(folder / manifest.components["unet"].file, spec)
    feeds = spec.sample(np.random.default_rng(0), **dims(manifest.architecture))
    with pytest.raises(InvalidRequest, match="do not match the graph's"):
        runtime.run({**feeds, "extra": feeds["timestep"]})
    with pytest.raises(InvalidRequest, match="do not match the graph's"):
        runtime.run({k: v for k, v in feeds.items() if k != "timestep"})
    with pytest.raises(InvalidRequest, match="do not match the graph's"):
        runtime.run({"latents" if k == "sample" else k: v for k, v in feeds.items()})
    with pytest.raises(InvalidRequest, match=r"'timestep' has shape \(3, 1\), expected rank 1"):
        runtime.run({**feeds, "timestep": feeds["timestep"][:, None]})
    with pytest.raises(InvalidRequest, match="'sample' .* expected rank 4"):
        runtime.run({**feeds, "sample": feeds["sample"][0]})
