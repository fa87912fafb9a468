"""``sdrt bench``: a quick run on the tiny export (sdrt ONNX Runtime + the diffusers peer) and its outputs."""
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
