"""Session fixtures: tiny random-weight SD models (diffusers folders) and their sdrt exports.

Built once per session with the same code path a real model takes (save_pretrained -> sdrt export).
They need the export extra (torch, diffusers); without it the tests that use them skip.
"""
from __future__ import annotations

from pathlib import Path

import pytest


def _build(tmp_path_factory, name: str, **kwargs) -> Path:
    pytest.importorskip("diffusers")
    from sdrt.exporters.random_model import build_random_model
    return build_random_model(tmp_path_factory.mktemp(name) / "model", "tiny", **kwargs)


def _export(tmp_path_factory, model_dir: Path, name: str, **options) -> Path:
    from sdrt.exporters import ExportOptions, export
    out = tmp_path_factory.mktemp(name) / "sdrt"
    export(str(model_dir), out, ExportOptions(**options), progress=False)
    return out


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
