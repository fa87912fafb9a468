"""``sdrt bench``: quick runs on the tiny exports (sdrt ONNX Runtime + the diffusers peer, the reference whose image
sdrt's must equal) and their outputs: SD 1.x, SDXL, and SD-Turbo-style settings with the tiny autoencoder.
The Optimum peers need their own environments (--peer-python) and are not run here."""
from __future__ import annotations

import json
import sys

import pytest

from sdrt.benchmark import BenchOptions, report, run
from sdrt.cli import main as sdrt_main


def main(argv):
    return sdrt_main(["bench", *argv])


SDRT = "sdrt onnxruntime fp32"


@pytest.fixture(scope="module")
def results(tiny_export, tmp_path_factory):
    pytest.importorskip("diffusers")
    out = tmp_path_factory.mktemp("bench")
    options = BenchOptions(runtimes=("onnxruntime",), size=(64, 64), steps=2, runs=1, warmup=1, threads=2,
                           peers=("diffusers",), json=out / "bench.json", markdown=out / "bench.md",
                           chart=out / "bench.png", progress=False)
    return run(tiny_export, options), out


def test_json_has_every_number(results):
    _, out = results
    data = json.loads((out / "bench.json").read_text())
    assert data["settings"]["width"] == 64 and data["settings"]["steps"] == 2
    assert data["machine"]["logical_cores"] >= 1 and data["machine"]["cpu"]
    assert "onnxruntime" in data["machine"]["versions"]
    systems = {s["name"]: s for s in data["systems"]}
    assert set(systems) == {SDRT, "diffusers"}
    for system in systems.values():
        assert system["status"] == "ok", system
        assert system["load_s"] > 0 and system["e2e"]["median_s"] > 0 and system["peak_rss_bytes"] > 2**20
        for part in ("text_encoder", "unet_step", "vae_decoder", "vae_encoder"):
            assert system["components"][part]["median_s"] > 0, (system["name"], part)
    assert systems[SDRT]["components"]["unet_step"]["batch"] == 2           # CFG: [uncond; cond]
    assert systems["diffusers"]["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert data["ratios"][SDRT]["diffusers"] > 0


def test_markdown_and_chart(results):
    data, out = results
    text = (out / "bench.md").read_text()
    assert f"| {SDRT} |" in text and "| diffusers |" in text and "vs diffusers" in text
    ratio = data["ratios"][SDRT]["diffusers"]
    assert f"{ratio:.2f}×" in text
    png = out / "bench.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in data["markdown"]
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_and_crashing_peers_are_rows_not_errors(tiny_export):
    options = BenchOptions(runtimes=("onnxruntime",), size=(64, 64), steps=1, runs=1, warmup=0,
                           peers=("diffusers",), interpreters={"diffusers": "/nonexistent/python"},
                           progress=False)
    data = run(tiny_export, options)
    peer = next(s for s in data["systems"] if s["name"] == "diffusers")
    assert peer["status"] == "failed" and "/nonexistent/python" in peer["error"]
    assert "| diffusers | failed:" in data["markdown"]
    fake = {"name": "optimum-intel", "kind": "peer", "status": "not installed", "error": "no module optimum"}
    text = report.markdown({**data, "systems": data["systems"] + [fake]})
    assert "| optimum-intel | not installed: no module optimum |" in text


def test_cli_prints_the_table(tiny_export, capsys):
    assert main([str(tiny_export), "--runtime", "onnxruntime", "--peers", "none", "--size", "64",
                 "--steps", "1", "--runs", "1", "--warmup", "0"]) == 0
    assert f"| {SDRT} |" in capsys.readouterr().out
    assert main([str(tiny_export), "--size", "60"]) == 2                    # not a multiple of 8
    assert main([str(tiny_export), "--peers", "torch"]) == 2


def test_worker_output_is_one_json_line(tiny_export):
    import subprocess
    spec = {"kind": "sdrt", "runtime": "onnxruntime", "precision": "fp32", "folder": str(tiny_export),
            "width": 64, "height": 64, "steps": 1, "guidance": 7.5, "batch": 1, "runs": 1, "warmup": 0,
            "threads": 1, "seed": 1, "sampler": "Euler a", "prompt": "a cat"}
    out = subprocess.run([sys.executable, "-m", "sdrt.benchmark.worker", json.dumps(spec)], capture_output=True,
                         check=True, text=True).stdout
    result = json.loads(out)
    assert out.count("\n") == 1 and result["status"] == "ok" and not result["torch_imported"]


# -- SDXL and few-step settings: every system runs what sdrt runs (its image equals diffusers') ------------

@pytest.fixture(scope="module")
def xl_export(tmp_path_factory, tiny_taesd_dir):
    pytest.importorskip("diffusers")
    from sdrt.exporters import ExportOptions, export
    from sdrt.exporters.random_model import build_random_model
    model = build_random_model(tmp_path_factory.mktemp("bench_sdxl") / "model", "tiny-sdxl", seed=4)
    out = tmp_path_factory.mktemp("bench_sdxl") / "sdrt"
    export(str(model), out, ExportOptions(check_parity=False, tiny_vae=str(tiny_taesd_dir)), progress=False)
    return out


def test_sdxl_components_and_the_diffusers_sdxl_peer(xl_export, tiny_taesd_dir):
    options = BenchOptions(runtimes=("onnxruntime",), size=(64, 64), steps=1, runs=1, warmup=0, threads=2,
                           peers=("diffusers",), vae="tiny", tiny_vae_source=tiny_taesd_dir, progress=False)
    data = run(xl_export, options)
    assert data["settings"]["family"] == "sdxl"
    systems = {s["name"]: s for s in data["systems"]}
    ours, peer = systems[SDRT], systems["diffusers"]
    assert ours["status"] == "ok" and peer["status"] == "ok", data["systems"]
    for system in (ours, peer):
        for part in ("text_encoder", "text_encoder_2", "unet_step", "vae_decoder_tiny", "vae_encoder"):
            assert system["components"][part]["median_s"] > 0, (system["name"], part)
    assert ours["components"]["unet_step"]["batch"] == 2 and ours["components"]["vae_decoder"]["median_s"] > 0
    assert set(ours["e2e"]["inside_s"]) >= {"text_encoder", "text_encoder_2", "unet", "vae_decoder_tiny"}
    # StableDiffusionXLPipeline (no negative prompt: zeros, as sdrt's empty one) with the AutoencoderTiny
    # draws sdrt's image
    assert peer["image_diff"]["vs"] == SDRT and peer["image_diff"]["max"] <= 2, peer["image_diff"]
    assert "(sdxl)" in data["markdown"] and "text enc 2 ms" in data["markdown"]


@pytest.fixture(scope="module")
def taesd_export(tmp_path_factory, tiny_model_dir, tiny_taesd_dir):
    from sdrt.exporters import ExportOptions, export
    out = tmp_path_factory.mktemp("bench_taesd") / "sdrt"
    export(str(tiny_model_dir), out, ExportOptions(tiny_vae=str(tiny_taesd_dir), check_parity=False),
           progress=False)
    return out


def test_turbo_settings_tiny_vae_and_no_cfg(taesd_export, tiny_taesd_dir, tmp_path):
    assert main([str(taesd_export), "--runtime", "onnxruntime", "--peers", "diffusers", "--size", "64",
                 "--steps", "2", "--guidance", "0", "--sampler", "Euler a", "--scheduler", "sgm_uniform",
                 "--vae", "tiny", "--tiny-vae-source", str(tiny_taesd_dir), "--runs", "1", "--warmup", "0",
                 "--threads", "2", "--json", str(tmp_path / "b.json")]) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["settings"]["vae"] == "tiny" and data["settings"]["scheduler"] == "sgm_uniform"
    systems = {s["name"]: s for s in data["systems"]}
    ours, peer = systems[SDRT], systems["diffusers"]
    assert ours["components"]["unet_step"]["batch"] == 1                  # guidance 0: no [uncond; cond]
    assert ours["components"]["vae_decoder_tiny"]["median_s"] > 0
    assert ours["e2e"]["inside_s"]["vae_decoder_tiny"] > 0 and ours["e2e"]["inside_s"]["vae_decoder"] == 0
    assert peer["components"]["vae_decoder_tiny"]["median_s"] > 0 and "vae_decoder" not in peer["components"]
    assert peer["scheduler"] == "EulerAncestralDiscreteScheduler"
    # trailing spacing, one UNet row, AutoencoderTiny: diffusers draws sdrt's image
    assert peer["image_diff"]["max"] <= 2, peer["image_diff"]


def test_few_step_options_are_checked(tiny_export):
    assert main([str(tiny_export), "--peers", "none", "--sampler", "Euler q"]) == 2
    assert main([str(tiny_export), "--peers", "none", "--scheduler", "exponential"]) == 2
    assert main([str(tiny_export), "--peers", "none", "--vae", "tiny"]) == 2     # exported without --tiny-vae


def test_one_sdrt_row_per_unet_precision(tmp_path):
    """An SDXL --fp16 export keeps its VAE fp32: that is one fp16 system to measure, not an extra "fp32" row
    running the fp16 graphs; and the Optimum peers are told to store fp16 weights like it."""
    pytest.importorskip("openvino")
    from sdrt import manifest as mf
    from sdrt.benchmark import _sdrt_jobs, _settings
    components = {"unet": mf.Component("unet_sdxl", "unet.onnx", "fp16"),
                  "vae_decoder": mf.Component("vae_decoder", "vae_decoder.onnx", "fp32")}
    manifest = mf.Manifest(source="sdxl", architecture={"family": "sdxl"}, components=components)
    options = BenchOptions(runtimes=("openvino",), peers=())
    assert [name for name, *_ in _sdrt_jobs(tmp_path, manifest, options)] == ["sdrt openvino fp16"]
    assert _settings(tmp_path, manifest, options)["weight_format"] == "fp16"
