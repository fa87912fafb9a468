"""The OpenVINO backend: parity with ONNX Runtime, static builds, the build cache, device and auto choice."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt.cli import main
from sdrt.errors import BackendUnavailable, InvalidRequest, ProfileError
from sdrt.runtimes import BuildOptions

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")
from sdrt.runtimes.openvino import CACHE, MODEL_CACHE, OvRuntime  # noqa: E402

TOLERANCE = 2           # max |difference| per pixel, out of 255, fp32
KW = dict(width=64, height=64, steps=4, seed=7, sampler="Euler a", negative_prompt="blurry")
STATIC = BuildOptions(backend="openvino", static=(64, 64), batch=1)


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def max_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def copy_export(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


@pytest.fixture(scope="module")
def ort(tiny_export):
    return sdrt.load(tiny_export, runtime="onnxruntime", progress=False)


@pytest.fixture(scope="module")
def ov(tiny_export):
    return sdrt.load(tiny_export, runtime="openvino", progress=False)


@pytest.fixture(scope="module")
def init_image():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def static_export(tiny_export, tmp_path_factory):
    """A copy of the tiny export with a static 64x64 batch-1 OpenVINO build, made through the CLI."""
    folder = copy_export(tiny_export, tmp_path_factory.mktemp("ov_static") / "export")
    assert main(["build", str(folder), "--backend", "openvino", "--static", "64x64", "--batch", "1"]) == 0
    return folder


# -- parity with ONNX Runtime. Measured here (OpenVINO 2026.4.1, onnxruntime, 2-core CPU): max 1/255 for txt2img
#    (batch 2), img2img and 9-channel inpaint, a few pixels rounding the other way; UNet outputs differ by 1.5e-6.

def test_txt2img_matches_onnxruntime(ort, ov):
    assert isinstance(ov.models.unet.inner, OvRuntime)
    kw = {**KW, "batch_size": 2}
    assert max_diff(ov.txt2img("a red fox", **kw), ort.txt2img("a red fox", **kw)) <= TOLERANCE


def test_img2img_matches_onnxruntime(ort, ov, init_image):
    kw = {**KW, "strength": 0.6}
    assert max_diff(ov.img2img(init_image, "a fox", **kw), ort.img2img(init_image, "a fox", **kw)) <= TOLERANCE


def test_inpaint_9ch_matches_onnxruntime(tiny_inpaint_export, init_image):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    ours, ref = (sdrt.load(tiny_inpaint_export, runtime=rt, progress=False) for rt in ("openvino", "onnxruntime"))
    assert ours.models.arch["unet_in_channels"] == 9
    assert max_diff(ours.inpaint(init_image, mask, "a hat", **KW), ref.inpaint(init_image, mask, "a hat", **KW)) \
        <= TOLERANCE


# -- static builds -------------------------------------------------------------------------------------

def test_static_build_matches_dynamic(static_export, ov):
    pipe = sdrt.load(static_export, runtime="openvino", progress=False)
    unet = pipe.models.unet.inner
    assert unet.path.parent.parent == static_export / CACHE and unet.path.suffix == ".xml"
    assert tuple(unet.compiled.inputs[0].get_shape()) == (2, 4, 8, 8)      # CFG-doubled batch, 64/8
    assert max_diff(pipe.txt2img("a red fox", **KW), ov.txt2img("a red fox", **KW)) <= TOLERANCE   # measured 1


def test_static_build_rejects_other_sizes(static_export):
    pipe = sdrt.load(static_export, runtime="openvino", progress=False)
    with pytest.raises(ProfileError, match=r"static for \(2, 4, 8, 8\) \(64x64\).*--static 96x64"):
        pipe.txt2img("a red fox", **{**KW, "width": 96})
    with pytest.raises(ProfileError, match="--batch"):
        pipe.txt2img("a red fox", **{**KW, "batch_size": 2})


@pytest.fixture(scope="module")
def no_cfg_export(tiny_export, tmp_path_factory):
    """A copy of the tiny export with a static 64x64 batch-1 build for guidance-free requests (--no-cfg)."""
    folder = copy_export(tiny_export, tmp_path_factory.mktemp("ov_no_cfg") / "export")
    assert main(["build", str(folder), "--backend", "openvino", "--static", "64x64", "--batch", "1", "--no-cfg"]) == 0
    return folder


def test_no_cfg_static_build_runs_guidance_free_requests(no_cfg_export, ov):
    """SD-Turbo style (guidance 0): the UNet sees one row per image, and gives the dynamic build's image."""
    pipe = sdrt.load(no_cfg_export, runtime="openvino", progress=False)
    assert tuple(pipe.models.unet.inner.compiled.inputs[0].get_shape()) == (1, 4, 8, 8)
    kw = {**KW, "guidance_scale": 0.0, "negative_prompt": ""}
    assert max_diff(pipe.txt2img("a red fox", **kw), ov.txt2img("a red fox", **kw)) <= TOLERANCE


def test_guidance_mismatch_names_the_build_and_the_flag(static_export, no_cfg_export):
    guided = sdrt.load(static_export, runtime="openvino", progress=False)
    with pytest.raises(ProfileError, match=r"static for \(2, 4, 8, 8\) \(64x64\); rebuild with `sdrt build .* "
                                           r"--backend openvino --static 64x64 --batch 1 --no-cfg` \(1 image per "
                                           r"request at guidance_scale <= 1\)"):
        guided.txt2img("a red fox", **{**KW, "guidance_scale": 0.0})
    unguided = sdrt.load(no_cfg_export, runtime="openvino", progress=False)
    with pytest.raises(ProfileError, match=r"static for \(1, 4, 8, 8\) \(64x64\); rebuild with `sdrt build .* "
                                           r"--static 64x64 --batch 1` \(1 image per request with guidance_scale > 1\)"
                                           r" or `.* --batch 2 --no-cfg`"):
        unguided.txt2img("a red fox", **KW)


def test_no_cfg_is_part_of_the_build_key(static_export, no_cfg_export, capsys):
    def entry(folder):
        entries = [p for p in (folder / CACHE).iterdir() if p.name != MODEL_CACHE]
        assert len(entries) == 1
        return entries[0], json.loads((entries[0] / "build.json").read_text())["options"]
    (guided, options), (unguided, no_cfg) = entry(static_export), entry(no_cfg_export)
    assert guided.name != unguided.name
    assert no_cfg == {**options, "cfg": False} and "cfg" not in options    # builds before --no-cfg keep their key
    assert main(["build", str(no_cfg_export), "--backend", "openvino", "--no-cfg"]) == 2
    assert "--no-cfg fixes the UNet's batch of a static build" in capsys.readouterr().err


# a prompt of 2 77-token chunks (90 tokens) and one of 3 (165 tokens), A1111 style: chunks concatenated, unpadded
LONG, LONGER = "a red fox " * 30, "a red fox " * 55


@pytest.fixture(scope="module")
def chunks_export(tiny_export, tmp_path_factory):
    """A copy of the tiny export with a static 64x64 batch-1 build taking prompts of 1 or 2 chunks."""
    folder = copy_export(tiny_export, tmp_path_factory.mktemp("ov_chunks") / "export")
    assert main(["build", str(folder), "--backend", "openvino", "--static", "64x64", "--prompt-chunks", "2"]) == 0
    return folder


def test_prompt_chunks_static_build_runs_long_prompts(chunks_export, ov, ort):
    """Only the UNet's token axis is a range (77..154), its batch one row per image: a prompt and a negative
    prompt of different lengths run apart (as A1111 does), [uncond; cond] of one length as two calls. 1- and
    2-chunk prompts give the dynamic build's and ONNX Runtime's images."""
    pipe = sdrt.load(chunks_export, runtime="openvino", progress=False)
    unet = pipe.models.unet.inner
    width = ov.models.arch["cross_attention_dim"]
    assert unet.block == 1 and tuple(unet.compiled.input("sample").get_shape()) == (1, 4, 8, 8)
    assert tuple(unet.compiled.input("timestep").get_shape()) == (1,)
    assert str(unet.compiled.input("encoder_hidden_states").get_partial_shape()) == f"[1,77..154,{width}]"
    assert pipe.models.text_encoder.inner.compiled.input("input_ids").get_partial_shape().is_static
    for prompt, negative in (("a red fox", "blurry"), (LONG, "blurry"), (LONG, LONG)):
        kw = {**KW, "negative_prompt": negative}
        ours = pipe.txt2img(prompt, **kw)
        assert max_diff(ours, ov.txt2img(prompt, **kw)) <= TOLERANCE
        assert max_diff(ours, ort.txt2img(prompt, **kw)) <= TOLERANCE


def test_prompt_longer_than_the_build_names_the_chunks(chunks_export, static_export):
    pipe = sdrt.load(chunks_export, runtime="openvino", progress=False)
    with pytest.raises(ProfileError, match=r"'encoder_hidden_states' has shape \(1, 231, \d+\), but this OpenVINO "
                                           r"build is static for \(1, 77\.\.154, \d+\) \(prompts of up to 2 77-token "
                                           r"chunks\); rebuild with `sdrt build .* --backend openvino --static 64x64 "
                                           r"--batch 1 --prompt-chunks 3`"):
        pipe.txt2img(LONGER, **KW)
    default = sdrt.load(static_export, runtime="openvino", progress=False)
    with pytest.raises(ProfileError, match=r"has shape \(2, 154, \d+\), but this OpenVINO build is static for "
                                           r"\(2, 77, \d+\) \(prompts of one 77-token chunk\); rebuild with `sdrt build "
                                           r".* --static 64x64 --batch 1 --prompt-chunks 2`"):
        default.txt2img(LONG, **{**KW, "negative_prompt": LONG})
    with pytest.raises(ProfileError, match=r"'sample' has shape \(1, 4, 8, 8\).* differ in 77-token chunks .*"
                                           r"`sdrt build .* --static 64x64 --batch 1 --prompt-chunks K`"):
        default.txt2img(LONG, **KW)         # the negative prompt's block, one chunk, runs first, alone


def test_prompt_chunks_are_part_of_the_build_key(chunks_export, static_export, capsys):
    record = json.loads((sdrt.build(chunks_export, replace(STATIC, prompt_chunks=2), progress=False)
                         / "build.json").read_text())
    assert record["options"] == {"precision": "fp32", "static": [64, 64], "batch": 1, "prompt_chunks": 2}
    entry = sdrt.build(static_export, STATIC, progress=False)
    assert sdrt.build(static_export, replace(STATIC, prompt_chunks=1), progress=False) == entry    # the default
    assert main(["build", str(chunks_export), "--backend", "openvino", "--prompt-chunks", "2"]) == 2
    assert "--prompt-chunks bounds the prompt length of a static build" in capsys.readouterr().err


def test_build_and_load_reuse_the_cache(static_export):
    began = time.perf_counter()
    entry = sdrt.build(static_export, STATIC, progress=False)        # same options: the entry is reused
    assert time.perf_counter() - began < 3.0
    assert entry.parent == static_export / CACHE and (entry / "build.json").is_file()
    assert len([p for p in entry.parent.iterdir() if p.name != MODEL_CACHE]) == 1
    blobs = sorted((static_export / CACHE / MODEL_CACHE).iterdir())
    pipe = sdrt.load(static_export, runtime="openvino", progress=False)
    assert sorted((static_export / CACHE / MODEL_CACHE).iterdir()) == blobs      # compiled nothing new
    runtimes = [getattr(pipe.models, c).inner for c in ("text_encoder", "unet", "vae_encoder", "vae_decoder")]
    assert all(r.loaded_from_cache for r in runtimes)
    assert {r.path.parent for r in runtimes} == {entry}


def test_corrupted_entry_is_removed_and_rebuilt(static_export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(static_export, folder)
    entry = sdrt.build(folder, STATIC, progress=False)
    xml = entry / "unet.xml"
    xml.write_bytes(xml.read_bytes()[: xml.stat().st_size // 2])            # a truncated IR
    pipe = sdrt.load(folder, runtime="openvino", progress=False)            # never loads the broken entry
    assert not entry.exists()
    assert pipe.models.unet.inner.path == folder / "unet.onnx"                # the ONNX instead
    assert sdrt.build(folder, STATIC, progress=False) == entry
    record = json.loads((entry / "build.json").read_text())
    assert record["options"] == {"precision": "fp32", "static": [64, 64], "batch": 1}
    assert set(record["files"]) == {f"{c}.{ext}" for c in record["components"] for ext in ("xml", "bin")}
    (entry / "build.json").unlink()                                         # as a build killed before its record
    sdrt.load(folder, runtime="openvino", progress=False)
    assert not entry.exists()


# -- choice of runtime and device, option checks ---------------------------------------------------------

def test_auto_prefers_openvino(tiny_export):
    assert isinstance(sdrt.load(tiny_export, progress=False).models.unet.inner, OvRuntime)


def test_unknown_device(tiny_export):
    with pytest.raises(BackendUnavailable, match=r"'FPGA' is not available here; available: .*CPU"):
        sdrt.load(tiny_export, runtime="openvino", device="FPGA")
    with pytest.raises(BackendUnavailable, match="available: .*CPU"):
        sdrt.build(tiny_export, BuildOptions(device="FPGA"), progress=False)


def test_option_errors(tiny_export, tmp_path, capsys):
    with pytest.raises(InvalidRequest, match="takes no \\['device'\\]"):
        sdrt.load(tiny_export, runtime="onnxruntime", device="GPU")
    with pytest.raises(InvalidRequest, match="nothing to build"):
        sdrt.build(tiny_export, BuildOptions(backend="onnxruntime"))
    with pytest.raises(InvalidRequest, match="multiples of 8"):
        sdrt.build(tiny_export, BuildOptions(static=(60, 64)))
    with pytest.raises(InvalidRequest, match="only apply to --precision int8"):
        sdrt.build(tiny_export, BuildOptions(calibration_size=4))
    assert main(["build", str(tiny_export), "--backend", "openvino", "--batch", "2"]) == 2
    err = capsys.readouterr().err
    assert "--batch only applies to a static build" in err and err.count("\n") == 1
    built = [p.name for p in (tiny_export / CACHE).glob("*") if p.name != MODEL_CACHE]
    assert built == [], "a failed build left files behind"
