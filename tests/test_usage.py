"""The user-facing contracts around the pipeline: errors, CLI, PNG infotext, torch-free run, folder checks."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt.cli import main
from sdrt.errors import InvalidRequest, ModelFolderError


@pytest.fixture(scope="module")
def pipe(tiny_export):
    return sdrt.load(tiny_export, progress=False)


@pytest.mark.parametrize("kwargs, words", [
    (dict(width=60), "multiples of 8"),
    (dict(height=0), "multiples of 8"),
    (dict(steps=0), "steps"),
    (dict(sampler="Eulr"), "Euler a"),               # the message lists the valid names
    (dict(batch_size=0), "batch_size"),
    (dict(rng="gpu"), "cpu"),
    (dict(latents=np.zeros((1, 4, 3, 3), np.float32)), "latents"),
    (dict(colour="red"), "colour"),
])
def test_bad_txt2img_requests(pipe, kwargs, words):
    with pytest.raises(InvalidRequest, match=words):
        pipe.txt2img("a cat", **{"width": 64, "height": 64, "steps": 2, **kwargs})


def test_bad_image_requests(pipe):
    image = Image.new("RGB", (64, 64), "gray")
    with pytest.raises(InvalidRequest, match=r"strength"):
        pipe.img2img(image, "a cat", strength=1.5, steps=2)
    with pytest.raises(InvalidRequest, match=r"same size"):
        pipe.inpaint(image, Image.new("L", (64, 48)), "a cat", steps=2)
    with pytest.raises(InvalidRequest, match=r"strength"):
        pipe.img2img(image, "a cat", strength=0.05, steps=4)      # leaves no step to run


def test_missing_vae_encoder(tiny_export, tmp_path):
    folder = tmp_path / "no-encoder"
    shutil.copytree(tiny_export, folder)
    manifest = json.loads((folder / "sdrt.json").read_text())
    file = manifest["components"].pop("vae_encoder")["file"]
    manifest["files"].pop(file)
    (folder / file).unlink()
    (folder / "sdrt.json").write_text(json.dumps(manifest))
    p = sdrt.load(folder, progress=False)
    p.txt2img("a cat", width=64, height=64, steps=2)                    # txt2img needs no encoder
    with pytest.raises(InvalidRequest, match="VAE encoder"):
        p.img2img(Image.new("RGB", (64, 64)), "a cat", steps=2)


def test_folder_checks(tiny_export, tmp_path):
    with pytest.raises(ModelFolderError, match="not an sdrt export"):
        sdrt.load(tmp_path)
    folder = tmp_path / "tampered"
    shutil.copytree(tiny_export, folder)
    shutil.rmtree(folder / "cache", ignore_errors=True)
    with open(folder / "unet.onnx", "r+b") as f:
        f.seek(-64, 2)
        f.write(b"\0" * 64)
    with pytest.raises(ModelFolderError, match="unet.onnx does not match its sha256"):
        sdrt.load(folder)


def test_cli_generate_writes_infotext(tiny_export, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code = main(["generate", str(tiny_export), "--prompt", "a cat, sitting", "--negative-prompt", "dog",
                 "--width", "64", "--height", "64", "--steps", "3", "--sampler", "DPM++ 2M Karras",
                 "--seed", "42", "--batch-size", "2", "--output", str(out)])
    assert code == 0
    text = Image.open(out).text["parameters"]
    assert text.splitlines()[0] == "a cat, sitting"
    assert text.splitlines()[1] == "Negative prompt: dog"
    assert "Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 64x64" in text
    assert "Seed: 43" in Image.open(tmp_path / "cat-1.png").text["parameters"]


def test_cli_user_error_is_one_line(tiny_export, tmp_path, capsys):
    code = main(["generate", str(tiny_export), "--prompt", "x", "--width", "65", "--output",
                 str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "multiples of 8" in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_img2img_and_inpaint(tiny_export, tmp_path):
    Image.new("RGB", (64, 64), "orange").save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(tmp_path / "mask.png")
    assert main(["generate", str(tiny_export), "--prompt", "x", "--steps", "4", "--init-image",
                 str(tmp_path / "init.png"), "--seed", "1", "--output", str(tmp_path / "i2i.png")]) == 0
    assert main(["generate", str(tiny_export), "--prompt", "x", "--steps", "4", "--init-image",
                 str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--seed", "1",
                 "--output", str(tmp_path / "inpaint.png")]) == 0
    for name in ("i2i.png", "inpaint.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size == (64, 64) and "Denoising strength" in im.text["parameters"]


def test_cli_inpainting_options(tiny_export, tmp_path):
    """--only-masked, --mask-blur, --inpainting-fill, --invert-mask, --resize-mode reach the Python API."""
    import sdrt
    import numpy as np
    x = np.linspace(0, 255, 96, dtype=np.uint8)
    image = Image.fromarray(np.stack([np.tile(x, (80, 1)), np.tile(x[:80, None], (1, 96)),
                                      np.full((80, 96), 60, np.uint8)], axis=-1))
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (50, 30, 70, 50))
    image.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    common = ["generate", str(tiny_export), "--prompt", "x", "--steps", "2", "--seed", "3", "--width", "64",
              "--height", "64", "--strength", "0.7", "--init-image", str(tmp_path / "init.png")]
    assert main([*common, "--mask", str(tmp_path / "mask.png"), "--only-masked", "--only-masked-padding", "4",
                 "--mask-blur", "2", "--inpainting-fill", "latent noise", "--invert-mask", "--resize-mode", "1",
                 "--output", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--resize-mode", "3", "--output", str(tmp_path / "b.png")]) == 0
    pipe = sdrt.load(tiny_export, progress=False)
    kw = dict(steps=2, seed=3, width=64, height=64, strength=0.7)
    a = pipe.inpaint(image, mask, "x", only_masked=True, padding=4, mask_blur=2, fill="latent noise",
                     invert_mask=True, resize_mode=1, **kw)
    b = pipe.img2img(image, "x", resize_mode=3, **kw)
    for name, ref in (("a.png", a), ("b.png", b)):
        with Image.open(tmp_path / name) as im:
            assert np.array_equal(np.asarray(im), np.asarray(ref[0]))
            assert im.text["parameters"] == ref.infotexts[0]


def test_run_path_is_torch_free(tiny_export, tmp_path):
    """Block torch/diffusers/transformers imports in a fresh interpreter; load and generate must still work."""
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "diffusers", "transformers", "onnx"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import sdrt
        pipe = sdrt.load({str(tiny_export)!r}, progress=False)
        r = pipe.txt2img("a cat", width=64, height=64, steps=3, seed=1)
        r.save({str(tmp_path / 'free.png')!r})
        assert not any(m.split(".")[0] in ("torch", "diffusers") for m in sys.modules)
        print("ok", r.seeds[0])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok 1"
    assert (tmp_path / "free.png").exists()


def test_fp16_export_generates_close_to_fp32(tiny_model_dir, tiny_export, tmp_path):
    from sdrt.exporters import ExportOptions, export
    export(str(tiny_model_dir), tmp_path / "fp16", ExportOptions(fp16=True), progress=False)
    with pytest.raises(InvalidRequest, match="no fp32 build"):
        sdrt.load(tmp_path / "fp16", precision="fp32")
    kw = dict(width=64, height=64, steps=8, seed=3, sampler="DPM++ 2M", negative_prompt="blurry")
    half = np.asarray(sdrt.load(tmp_path / "fp16", precision="fp16", progress=False).txt2img("a cat", **kw)[0],
                      dtype=np.int16)
    full = np.asarray(sdrt.load(tiny_export, progress=False).txt2img("a cat", **kw)[0], dtype=np.int16)
    diff = np.abs(half - full)
    assert diff.mean() < 2.0 and diff.max() <= 24, (diff.mean(), diff.max())
