"""LoRAs and weight overrides on an existing export: sdrt against diffusers' ``load_lora_weights`` on the same
tiny model and seed, switching, OpenVINO (ONNX and `sdrt build` IR), fp16 with external data, errors, CLI.

The LoRA files are kohya-format ``.safetensors`` written here with safetensors' own writer: Linear modules of
the UNet and the text encoder, a 1x1 Conv (proj_in) and LoCon 3x3 Convs, rank 2-4 with alpha, fp16 values.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt.cli import main
from sdrt.errors import InvalidRequest, ModelFolderError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")                     # diffusers' LoRA loading needs it
from safetensors.torch import save_file  # noqa: E402

TOLERANCE = 2            # max |difference| per pixel out of 255, as in tests/pipelines/test_parity.py
PROMPT, NEGATIVE = "a red fox in the snow, photograph", "blurry"
KW = dict(negative_prompt=NEGATIVE, width=64, height=64, steps=6, guidance_scale=7.5, sampler="Euler", seed=3)
UNET_MODULES = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
                "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
                "down_blocks.0.attentions.0.proj_in",                    # Conv 1x1
                "down_blocks.0.resnets.0.conv1",                         # LoCon 3x3
                "down_blocks.0.resnets.0.time_emb_proj",
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
                "up_blocks.1.resnets.0.conv_shortcut")
TE_MODULES = ("text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1",
              "text_model.encoder.layers.3.self_attn.out_proj")


def kohya_lora(path, model, seed, rank, alpha, unet=UNET_MODULES, te=TE_MODULES, sigma=0.3):
    """A random kohya-format LoRA for the modules named (diffusers paths) of a diffusers pipeline ``model``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, modules, names in (("lora_unet_", dict(model.unet.named_modules()), unet),
                                   ("lora_te_", dict(model.text_encoder.named_modules()), te)):
        for name in names:
            m = modules.get(name) or modules[name.removeprefix("text_model.")]      # transformers 5: no text_model
            conv = isinstance(m, torch.nn.Conv2d)
            down = (rank, m.in_channels, *m.kernel_size) if conv else (rank, m.in_features)
            up = (m.out_channels, rank, 1, 1) if conv else (m.out_features, rank)
            key = prefix + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = (torch.randn(down, generator=g) * sigma).half()
            tensors[f"{key}.lora_up.weight"] = (torch.randn(up, generator=g) * sigma).half()
            tensors[f"{key}.alpha"] = torch.tensor(alpha).half()
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


@pytest.fixture(scope="module")
def reference_pipe(tiny_model_dir):
    """The diffusers pipeline of the tiny model with sdrt's "Euler" (EulerDiscreteScheduler)."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, reference_pipe):
    folder = tmp_path_factory.mktemp("loras")
    kohya_lora(folder / "fox.safetensors", reference_pipe, seed=1, rank=4, alpha=2.0)
    (folder / "sub").mkdir()                                    # names are found in subfolders too (A1111)
    kohya_lora(folder / "sub" / "snow.safetensors", reference_pipe, seed=2, rank=2, alpha=1.0)
    kohya_lora(folder / "unet_only.safetensors", reference_pipe, seed=3, rank=2, alpha=2.0, te=())
    return folder


@pytest.fixture(scope="module")
def references(reference_pipe, lora_dir) -> dict[str, np.ndarray]:
    """diffusers' images without LoRA, with fox, and with fox 0.8 + snow -0.6: loaded by ``load_lora_weights``,
    weighted by ``set_adapters``; the pipeline keeps both adapters loaded afterwards."""
    def generate():
        kw = {k: v for k, v in KW.items() if k not in ("steps", "sampler", "seed")}
        out = reference_pipe(PROMPT, num_inference_steps=KW["steps"], output_type="np",
                             generator=torch.Generator("cpu").manual_seed(KW["seed"]), **kw).images
        return (out[0] * 255).round().astype(np.int16)
    images = {"none": generate()}
    reference_pipe.load_lora_weights(str(lora_dir / "fox.safetensors"), adapter_name="fox")
    reference_pipe.load_lora_weights(str(lora_dir / "sub" / "snow.safetensors"), adapter_name="snow")
    reference_pipe.set_adapters(["fox"], adapter_weights=[1.0])
    images["fox"] = generate()
    reference_pipe.set_adapters(["fox", "snow"], adapter_weights=[0.8, -0.6])
    images["fox+snow"] = generate()
    return images


@pytest.fixture(scope="module")
def ort_pipe(tiny_export, lora_dir):
    return sdrt.load(tiny_export, runtime="onnxruntime", progress=False, lora_dir=lora_dir)


def image(pipe) -> tuple[np.ndarray, sdrt.Result]:
    result = pipe.txt2img(PROMPT, **KW)
    return np.asarray(result.images[0], dtype=np.int16), result


def diff(a, b) -> int:
    return int(np.abs(a - b).max())


def addnet_hash(path) -> str:
    """A1111's LoRA hash of a .safetensors file (kohya's): sha256 of the bytes after the JSON header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0]:]).hexdigest()[:12]


def check_against_diffusers(pipe, lora_dir, references):
    """Base, one LoRA, two weighted LoRAs (by name and by path) match diffusers; [] restores the image."""
    base, _ = image(pipe)
    assert diff(base, references["none"]) <= TOLERANCE
    pipe.set_loras([("fox", 1.0)])
    fox, result = image(pipe)
    assert diff(fox, references["fox"]) <= TOLERANCE
    assert diff(fox, base) > 8 * TOLERANCE                      # the LoRA visibly changes the image
    assert f'Lora hashes: "fox: {addnet_hash(lora_dir / "fox.safetensors")}"' in result.infotexts[0]
    pipe.set_loras([("fox", 0.8), (lora_dir / "sub" / "snow.safetensors", -0.6)])
    both, result = image(pipe)
    assert diff(both, references["fox+snow"]) <= TOLERANCE
    assert diff(both, fox) > 8 * TOLERANCE
    assert "Lora hashes: \"fox: " in result.infotexts[0] and ", snow: " in result.infotexts[0]
    pipe.set_loras([])
    again, result = image(pipe)
    assert np.array_equal(again, base)                          # bit-exact: the exported weights again
    assert "Lora hashes" not in result.infotexts[0]


def test_onnxruntime_matches_diffusers_and_switches(ort_pipe, lora_dir, references):
    pipe = ort_pipe
    check_against_diffusers(pipe, lora_dir, references)
    pipe.set_loras([("fox", 1.0)])
    unet, text_encoder = pipe.models.unet, pipe.models.text_encoder
    pipe.set_loras([("fox", 1.0)])                              # the same set again: nothing reloaded
    assert pipe.models.unet is unet and pipe.models.text_encoder is text_encoder
    pipe.set_loras([("fox", 1.0), ("unet_only", 0.5)])          # only the UNet's weights change
    assert pipe.models.unet is not unet and pipe.models.text_encoder is text_encoder
    pipe.set_loras([])


def test_prompt_tags(ort_pipe, lora_dir, references):
    """<lora:name:weight> in the prompt, as A1111: the tags leave the text, apply for that generation only,
    and add to the LoRAs set with set_loras."""
    kw = KW
    tagged = ort_pipe.txt2img(PROMPT + " <lora:fox:0.8> <lora:snow:-0.6>", **kw)
    assert diff(np.asarray(tagged.images[0], np.int16), references["fox+snow"]) <= TOLERANCE
    assert tagged.infotexts[0].startswith(PROMPT + " <lora:fox:0.8>") and "Lora hashes" in tagged.infotexts[0]
    plain, _ = image(ort_pipe)
    assert diff(plain, references["none"]) <= TOLERANCE                 # the tags' LoRAs are gone again
    ort_pipe.set_loras([("fox", 0.8)])
    combined = ort_pipe.txt2img(PROMPT + "<lora:snow:-0.6>", **kw)
    assert diff(np.asarray(combined.images[0], np.int16), references["fox+snow"]) <= TOLERANCE
    fox, _ = image(ort_pipe)                                            # set_loras' LoRA stays
    ort_pipe.set_loras([])
    assert diff(fox, plain) > 8 * TOLERANCE
    for bad, message in (("<lora:fox:x>", "must be a number"), ("<lora:fox:1:0.5>", "separate text-encoder"),
                         ("<lora:nope:1>", "no nope.safetensors")):
        with pytest.raises(InvalidRequest, match=message):
            ort_pipe.txt2img(PROMPT + bad, **kw)


def test_diffusers_peft_file(ort_pipe, reference_pipe, references, tmp_path):
    """A LoRA saved by diffusers (PEFT keys, alpha in the file's metadata) gives diffusers' image too."""
    from peft.utils import get_peft_model_state_dict
    parts = ("unet", "text_encoder")
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, **{f"{c}_lora_layers": get_peft_model_state_dict(getattr(reference_pipe, c), adapter_name="fox")
                     for c in parts},
        **{f"{c}_lora_adapter_metadata": getattr(reference_pipe, c).peft_config["fox"].to_dict() for c in parts})
    ort_pipe.set_loras([(tmp_path / "pytorch_lora_weights.safetensors", 1.0)])
    assert diff(image(ort_pipe)[0], references["fox"]) <= TOLERANCE
    ort_pipe.set_loras([])


def test_openvino_build_matches_diffusers(tiny_export, lora_dir, references, tmp_path):
    """On the IR of `sdrt build`; OpenVINO on the exported ONNX files is in the fp16 test below."""
    pytest.importorskip("openvino")
    built = shutil.copytree(tiny_export, tmp_path / "export", ignore=shutil.ignore_patterns("cache"))
    sdrt.build(built, sdrt.BuildOptions(backend="openvino"), progress=False)
    pipe = sdrt.load(built, runtime="openvino", progress=False, lora_dir=lora_dir)
    assert pipe.models.unet.inner.path.suffix == ".xml"
    check_against_diffusers(pipe, lora_dir, references)


def test_token_embedding_override_composes_with_lora(reference_pipe, references, ort_pipe, tiny_export, lora_dir):
    """Textual inversion's case: a longer token embedding table, with a text-encoder LoRA on top, against
    transformers' CLIP with the table resized and diffusers' LoRA loaded (by the ``references`` fixture)."""
    reference_pipe.set_adapters(["fox"], adapter_weights=[1.0])
    te = copy.deepcopy(reference_pipe.text_encoder)
    rows = np.random.default_rng(0).standard_normal((2, te.config.hidden_size)).astype(np.float32)
    te.resize_token_embeddings(te.config.vocab_size + 2)
    with torch.no_grad():
        te.get_input_embeddings().weight[-2:] = torch.from_numpy(rows)
        table = te.get_input_embeddings().weight.numpy().copy()
    ids = np.full((1, 77), 49407, np.int64)
    ids[0, :5] = [49406, 320, 49408, 49409, 49407]               # two tokens past the original vocabulary
    with torch.no_grad():
        expected = te(torch.from_numpy(ids))[0].numpy()
    pipes = [ort_pipe] + ([sdrt.load(tiny_export, runtime="openvino", progress=False)] if _has("openvino") else [])
    for pipe in pipes:
        pipe.override_weights("text_encoder", {"embeddings.token_embedding.weight": table})
        pipe.set_loras([(lora_dir / "fox.safetensors", 1.0)])
        ours = pipe.models.text_encoder.run({"input_ids": ids})["last_hidden_state"]
        assert np.abs(ours - expected).max() < 1e-4, pipe.models.text_encoder.inner
        text_encoder = pipe.models.text_encoder
        pipe.override_weights("text_encoder", {"text_model.embeddings.token_embedding.weight": table.copy()})
        assert pipe.models.text_encoder is text_encoder         # equal values: nothing reloaded
    with pytest.raises(InvalidRequest, match="shape"):
        ort_pipe.override_weights("text_encoder", {"embeddings.token_embedding.weight": table[:, :4]})
    with pytest.raises(InvalidRequest, match="no overridable weight"):
        ort_pipe.override_weights("unet", {"conv_in.bias": np.zeros(32, np.float32)})
    ort_pipe.override_weights("text_encoder", {})
    ort_pipe.set_loras([])


def test_fp16_export_with_external_data(tiny_model_dir, tiny_export, lora_dir, references, tmp_path, monkeypatch):
    """fp16 weights found by content, and weights kept in external data (as exports over 2 GB keep them)."""
    from sdrt.exporters import ExportOptions, export
    from sdrt.exporters import onnx as exporter
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_OVER", 0)
    export(str(tiny_model_dir), tmp_path / "fp16", ExportOptions(fp16=True, check_parity=False), progress=False)
    maps = {c: json.loads((tmp_path / "fp16" / f"{c}.weights.json").read_text())["weights"]
            for c in ("unet", "text_encoder")}
    full = {c: json.loads((tiny_export / f"{c}.weights.json").read_text())["weights"] for c in maps}
    for c in maps:
        assert maps[c].keys() == full[c].keys() and {e["dtype"] for e in maps[c].values()} == {"float16"}
    assert {e["file"] for e in maps["unet"].values()} == {"unet.onnx_data"}
    for runtime in ["onnxruntime"] + (["openvino"] if _has("openvino") else []):
        pipe = sdrt.load(tmp_path / "fp16", runtime=runtime, progress=False, lora_dir=lora_dir)
        pipe.set_loras([("fox", 0.8), ("snow", -0.6)])
        half, _ = image(pipe)
        d = np.abs(half - references["fox+snow"])
        assert d.mean() < 2.0 and d.max() <= 24, (runtime, d.mean(), d.max())    # test_usage's fp16 bounds
    assert np.abs(references["fox+snow"] - references["none"]).mean() > 8     # which the LoRAs' effect exceeds


def test_loras_that_do_not_fit_are_refused(ort_pipe, tmp_path):
    pipe = ort_pipe
    sdxl = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (4, 32, 32),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (4, 640, 640),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (4, 1024, 32)}  # SD 2.x dims
    tensors = {}
    for key, (rank, n_in, n_out) in sdxl.items():
        tensors |= {f"{key}.lora_down.weight": torch.zeros(rank, n_in), f"{key}.alpha": torch.tensor(1.0),
                    f"{key}.lora_up.weight": torch.zeros(n_out, rank), f"{key}.hada_w1_a": torch.zeros(2)}
    save_file(tensors, str(tmp_path / "xl.safetensors"))
    pipe.set_loras([("fox", 1.0)])
    unet = pipe.models.unet
    with pytest.raises(InvalidRequest) as e:
        pipe.set_loras([("fox", 1.0), (tmp_path / "xl.safetensors", 1.0)])
    message = str(e.value)
    assert "xl.safetensors" in message and "0 of 3 modules match" in message
    assert "2 match no module" in message and "lora_te1_text_model" in message and "1 have other shapes" in message
    assert "3 keys are of kinds sdrt does not apply" in message
    assert pipe.models.unet is unet and pipe.weights.hashes().startswith("fox: ")    # nothing changed
    with pytest.raises(InvalidRequest, match="no nothere.safetensors in"):
        pipe.set_loras([("nothere", 1.0)])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(InvalidRequest, match="not a readable .safetensors"):
        pipe.set_loras([(tmp_path / "bad.safetensors", 1.0)])
    pipe.set_loras([])


def test_export_without_weight_map_asks_for_a_re_export(tiny_export, lora_dir, tmp_path):
    old = shutil.copytree(tiny_export, tmp_path / "old", ignore=shutil.ignore_patterns("cache", "*.weights.json"))
    manifest = json.loads((old / "sdrt.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.endswith(".weights.json")}
    (old / "sdrt.json").write_text(json.dumps(manifest))
    pipe = sdrt.load(old, runtime="onnxruntime", progress=False, lora_dir=lora_dir)
    with pytest.raises(ModelFolderError, match="no weight map .*re-export"):
        pipe.set_loras([("fox", 1.0)])


def test_cli_lora(ort_pipe, tiny_export, lora_dir, tmp_path):
    out = tmp_path / "fox.png"
    args = ["generate", str(tiny_export), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--width", "64",
            "--height", "64", "--steps", "6", "--sampler", "Euler", "--seed", "3", "--runtime", "onnxruntime",
            "--lora-dir", str(lora_dir), "--lora", "fox:0.8", "--lora", f"{lora_dir / 'sub' / 'snow.safetensors'}:-0.6",
            "--output", str(out)]
    assert main(args) == 0
    ort_pipe.set_loras([("fox", 0.8), ("snow", -0.6)])
    expected, result = image(ort_pipe)
    with Image.open(out) as png:
        assert np.array_equal(np.asarray(png, dtype=np.int16), expected)
        assert png.info["parameters"] == result.infotexts[0]
    ort_pipe.set_loras([])


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
