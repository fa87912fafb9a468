"""Session fixtures: tiny random-weight SD models (diffusers folders) and their sdrt exports.

Built once per session with the same code path a real model takes (save_pretrained -> sdrt export).
They need the export extra (torch, diffusers); without it the tests that use them skip.
"""
from __future__ import annotations

from pathlib import Path

import pytest


def _build(tmp_path_factory, name: str, arch: str = "tiny", **kwargs) -> Path:
    pytest.importorskip("diffusers")
    from sdrt.exporters.random_model import build_random_model
    return build_random_model(tmp_path_factory.mktemp(name) / "model", arch, **kwargs)


def _export(tmp_path_factory, model_dir: Path, name: str, **options) -> Path:
    from sdrt.exporters import ExportOptions, export
    out = tmp_path_factory.mktemp(name) / "sdrt"
    export(str(model_dir), out, ExportOptions(**options), progress=False)
    return out


def random_controlnet(model_dir: Path, out: Path, seed: int) -> Path:
    """A ControlNet copied from the tiny UNet, its zero-initialised convolutions made random (else it is a no-op)."""
    import diffusers
    import torch
    unet = diffusers.UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    torch.manual_seed(seed)
    net = diffusers.ControlNetModel.from_unet(unet)
    for conv in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
        torch.nn.init.normal_(conv.weight, std=0.1)
        torch.nn.init.normal_(conv.bias, std=0.1)
    net.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def controlnet_dirs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("controlnets")
    return {name: random_controlnet(tiny_model_dir, root / name, seed) for name, seed in (("canny", 5), ("depth", 6))}


@pytest.fixture(scope="session")
def control_export(tmp_path_factory, tiny_model_dir, controlnet_dirs) -> Path:
    """The tiny model with both ControlNets; 'canny' named by default from its folder, 'depth' by NAME=."""
    nets = (str(controlnet_dirs["canny"]), f"depth={controlnet_dirs['depth']}")
    return _export(tmp_path_factory, tiny_model_dir, "control_export", controlnets=nets)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_inpaint_model_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "tiny_inpaint", inpaint=True, seed=1)


@pytest.fixture(scope="session")
def tiny_vpred_model_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "tiny_vpred", prediction_type="v_prediction", seed=2)


@pytest.fixture(scope="session")
def tiny_sd2_model_dir(tmp_path_factory) -> Path:
    """SD 2.x's architecture in small (OpenCLIP-style GELU text encoder, "!" padding), 768-v style."""
    return _build(tmp_path_factory, "tiny_sd2", "tiny-sd2", prediction_type="v_prediction", seed=3)


@pytest.fixture(scope="session")
def tiny_sd2_inpaint_model_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "tiny_sd2_inpaint", "tiny-sd2", inpaint=True, seed=4)


@pytest.fixture(scope="session")
def tiny_sd2_export(tmp_path_factory, tiny_sd2_model_dir) -> Path:
    return _export(tmp_path_factory, tiny_sd2_model_dir, "tiny_sd2_export")


@pytest.fixture(scope="session")
def tiny_sd2_inpaint_export(tmp_path_factory, tiny_sd2_inpaint_model_dir) -> Path:
    return _export(tmp_path_factory, tiny_sd2_inpaint_model_dir, "tiny_sd2_inpaint_export")


@pytest.fixture(scope="session")
def tiny_lcm_model_dir(tmp_path_factory) -> Path:
    """An LCM-distilled-like UNet: it takes the guidance-scale embedding (time_cond_proj_dim)."""
    return _build(tmp_path_factory, "tiny_lcm", seed=3, time_cond_proj_dim=32)


@pytest.fixture(scope="session")
def tiny_taesd_dir(tmp_path_factory) -> Path:
    """A random AutoencoderTiny of TAESD's structure (what ``--tiny-vae madebyollin/taesd`` loads)."""
    pytest.importorskip("diffusers")
    from sdrt.exporters.random_model import build_random_tiny_vae
    return build_random_tiny_vae(tmp_path_factory.mktemp("taesd") / "taesd", seed=4)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_model_dir) -> Path:
    return _export(tmp_path_factory, tiny_model_dir, "tiny_export")


@pytest.fixture(scope="session")
def tiny_inpaint_export(tmp_path_factory, tiny_inpaint_model_dir) -> Path:
    return _export(tmp_path_factory, tiny_inpaint_model_dir, "tiny_inpaint_export")


@pytest.fixture(scope="session")
def tiny_vpred_export(tmp_path_factory, tiny_vpred_model_dir) -> Path:
    return _export(tmp_path_factory, tiny_vpred_model_dir, "tiny_vpred_export")


@pytest.fixture(scope="session")
def tiny_fp16_export(tmp_path_factory, tiny_model_dir) -> Path:
    return _export(tmp_path_factory, tiny_model_dir, "tiny_fp16_export", fp16=True)
