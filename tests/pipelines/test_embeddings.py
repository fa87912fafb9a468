"""Textual-inversion embeddings (A1111's embeddings folder) against diffusers' ``load_textual_inversion``
on the same tiny model: a multi-vector A1111 .safetensors file, an A1111 .pt file, a diffusers file."""
from __future__ import annotations

import numpy as np
import pytest

import sdrt
from sdrt.errors import InvalidRequest
from sdrt.pipelines import embeddings

from .conftest import WORST

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

TOLERANCE, STEPS = 2, 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """fox-style: 2 vectors (A1111 .safetensors); snowy: 1 vector (A1111 .pt); glowzq: diffusers format;
    wide: 768-wide vectors, which the tiny model (32) must skip."""
    d = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(2, 32, generator=g) * 0.4}, str(d / "fox-style.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(1, 32, generator=g) * 0.4}, "name": "snowy", "step": 10},
               d / "snowy.pt")
    save_file({"<glowzq>": torch.randn(32, generator=g) * 0.4}, str(d / "glowzq.safetensors"))
    save_file({"emb_params": torch.randn(1, 768, generator=g)}, str(d / "wide.safetensors"))
    return d


@pytest.fixture(scope="module")
def pipe(tiny_export, folder):
    return sdrt.load(tiny_export, runtime="onnxruntime", progress=False, embeddings_dir=folder)


def test_folder_is_read_as_a1111_does(folder):
    loaded, skipped = embeddings.read_folder(folder, 32)
    assert {e.name: e.vectors.shape for e in loaded} == {"fox-style": (2, 32), "snowy": (1, 32), "glowzq": (1, 32)}
    assert [p.name for p in skipped] == ["wide.safetensors"]


def test_embeddings_match_diffusers(pipe, folder, tiny_model_dir):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    for name, file in (("fox-style", "fox-style.safetensors"), ("snowy", "snowy.pt"), ("glowzq", "glowzq.safetensors")):
        ref.load_textual_inversion(str(folder / file), token=name)
    prompt, negative = "a fox-style painting, snowy, with glowzq", "blurry glowzq"
    ours = pipe.txt2img(prompt, negative_prompt=negative, width=64, height=64, steps=STEPS, sampler="Euler",
                        seed=4)
    out = ref(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64,
              generator=torch.Generator("cpu").manual_seed(4), output_type="np").images
    theirs = (out * 255).round().astype(np.int16)
    diff = int(np.abs(np.asarray(ours.images[0], np.int16)[None] - theirs).max())
    WORST["textual inversion"] = diff
    assert diff <= TOLERANCE
    plain = pipe.txt2img("a fox style painting, snow, with light", negative_prompt="blurry", width=64,
                         height=64, steps=STEPS, sampler="Euler", seed=4)
    assert np.abs(np.asarray(plain.images[0], np.int16) - theirs[0]).max() > 8      # the embeddings matter


def test_bad_embedding_file(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidRequest, match="embedding .*broken.safetensors: not a readable"):
        embeddings.read(tmp_path / "broken.safetensors")
    assert embeddings.read_folder(tmp_path, 32) == ([], [tmp_path / "broken.safetensors"])


def test_cli_embeddings_dir(pipe, tiny_export, folder, tmp_path):
    from PIL import Image

    from sdrt.cli import main
    out = tmp_path / "fox.png"
    assert main(["generate", str(tiny_export), "--prompt", "a fox-style painting", "--width", "64", "--height",
                 "64", "--steps", "2", "--seed", "5", "--runtime", "onnxruntime", "--embeddings-dir", str(folder),
                 "--output", str(out)]) == 0
    expected = pipe.txt2img("a fox-style painting", width=64, height=64, steps=2, seed=5, sampler="Euler a")
    assert (np.asarray(Image.open(out)) == np.asarray(expected.images[0])).all()


def test_sdxl_files_give_both_parts(tmp_path):
    """clip_l for the first text encoder (and SD 1.x), clip_g for SDXL's second; an SDXL model skips others."""
    save_file({"clip_l": torch.ones(2, 32), "clip_g": torch.ones(2, 48)}, str(tmp_path / "xl.safetensors"))
    save_file({"emb_params": torch.ones(1, 32)}, str(tmp_path / "sd1.safetensors"))
    save_file({"clip_l": torch.ones(2, 32), "clip_g": torch.ones(3, 48)}, str(tmp_path / "torn.safetensors"))
    emb = embeddings.read(tmp_path / "xl.safetensors")
    assert emb.vectors.shape == (2, 32) and emb.vectors_g.shape == (2, 48) and emb.part(True) is emb.vectors_g
    with pytest.raises(InvalidRequest, match="as many for both text encoders"):
        embeddings.read(tmp_path / "torn.safetensors")
    def names(*widths):
        return [e.name for e in embeddings.read_folder(tmp_path, *widths)[0]]
    assert names(32, 48) == names(None, 48) == ["xl"]            # SDXL base, refiner (bigG only)
    assert names(32) == ["sd1", "xl"] and names(32, 64) == []     # SD 1.x: the clip_l part; another width
