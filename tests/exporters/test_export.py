"""Export tiny random-weight models and check the folder, the graphs and their parity with torch."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from sdrt import manifest as mf                                        # noqa: E402
from sdrt.errors import ExportError, ModelFolderError, ParityError     # noqa: E402
from sdrt.exporters import ExportOptions, export                       # noqa: E402
from sdrt.exporters import onnx as ox                                  # noqa: E402
from sdrt.exporters import sources                                      # noqa: E402
from sdrt.exporters.sources import load_source                         # noqa: E402
from sdrt.specs import SPECS, VAE_DECODER, half, spec_for              # noqa: E402

from .ldm import to_single_file                                        # noqa: E402

PROMPTS = ["a photo of an astronaut riding a horse on mars",
           "A (masterpiece:1.2), BEST quality!!  café\tnaïve 1234, <|endoftext|> over",
           "", "emoji 🐱 and 日本語, don't"]


@pytest.fixture(scope="module")
def source(tiny_model_dir):
    return load_source(str(tiny_model_dir), progress=False)


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(folder, name, feeds):
    s = session(folder / f"{name}.onnx")
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def weight_bytes(path):
    import onnx
    return ox._tensor_bytes(onnx.load(str(path)))


FEW_STEP = {"unet_lcm", "vae_encoder_tiny", "vae_decoder_tiny"}    # LCM UNets and --tiny-vae only


def test_every_spec_is_exported(tiny_export):
    manifest = mf.read(tiny_export)
    assert set(SPECS) == set(ox.WRAPPERS)
    assert set(manifest.components) == {c.spec for c in manifest.components.values()} == set(SPECS) - FEW_STEP
    for name, component in manifest.components.items():
        spec = spec_for(component, manifest.architecture)
        s = session(tiny_export / component.file)
        assert [i.name for i in s.get_inputs()] == [t.name for t in spec.inputs]
        assert [o.name for o in s.get_outputs()] == [t.name for t in spec.outputs]
        assert component.precision == "fp32"


@pytest.fixture(scope="module")
def few_step_source(tiny_lcm_model_dir, tiny_taesd_dir):
    from sdrt.exporters.sources import load_tiny_vae
    lcm = load_source(str(tiny_lcm_model_dir), progress=False)
    lcm.tiny_vae = load_tiny_vae(str(tiny_taesd_dir), lcm, progress=False)
    return lcm


@pytest.mark.parametrize("name", sorted(SPECS))
def test_component_parity(request, name, tmp_path):
    source = request.getfixturevalue("few_step_source" if name in FEW_STEP else "source")
    files, diffs = ox.export_component(source, name, tmp_path)
    assert files == [tmp_path / f"{name}.onnx", tmp_path / f"{name}.weights.json"]
    assert set(diffs) == {t.name for t in SPECS[name].outputs}
    assert all(d <= SPECS[name].atol for d in diffs.values()), diffs


def test_parity_error_lists_every_failing_output(source, tmp_path):
    ox.export_component(source, "text_encoder", tmp_path, check_parity=False)
    broken = copy.deepcopy(source)
    with torch.no_grad():
        broken.text_encoder.final_layer_norm.bias += 0.5          # moves all three outputs
    feeds = SPECS["text_encoder"].sample(np.random.default_rng(0), **ox.check_dims(source, "text_encoder"))
    with pytest.raises(ParityError) as e:
        ox.parity(ox.TextEncoder(broken), SPECS["text_encoder"], tmp_path / "text_encoder.onnx", feeds)
    assert e.value.component == "text_encoder"
    assert len(e.value.failures) == 3
    for out, failure in zip(("last_hidden_state", "pooler_output", "hidden_states"), e.value.failures):
        assert failure.startswith(f"{out}: max diff ") and float(failure.split()[3]) > 0.4
    ox.parity(ox.TextEncoder(source), SPECS["text_encoder"], tmp_path / "text_encoder.onnx", feeds)


def test_manifest_hashes_every_file(tiny_export):
    manifest = mf.read(tiny_export, verify=True)
    on_disk = {p.relative_to(tiny_export).as_posix() for p in tiny_export.rglob("*")
               if p.is_file() and p.name != mf.MANIFEST and "cache" not in p.parts}
    assert set(manifest.files) == on_disk
    assert {"scheduler.json", "tokenizer/tokenizer.json", "unet.onnx"} <= on_disk
    for rel, digest in manifest.files.items():
        assert mf.sha256(tiny_export / rel) == digest


def test_architecture_facts(tiny_export, tiny_inpaint_export, tiny_vpred_export):
    facts = mf.read(tiny_export).architecture
    assert facts == dict(facts, family="sd1", latent_channels=4, unet_in_channels=4, vae_factor=8,
                         vae_scaling_factor=0.18215, prediction_type="epsilon", cross_attention_dim=32,
                         sample_size=8, text_layers=5, hidden_size=32, model_max_length=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, inpaint=False)
    inpaint = mf.read(tiny_inpaint_export).architecture
    assert inpaint["inpaint"] and inpaint["unet_in_channels"] == 9
    assert session(tiny_inpaint_export / "unet.onnx").get_inputs()[0].shape[1] == "CI"
    assert mf.read(tiny_vpred_export).architecture["prediction_type"] == "v_prediction"
    scheduler = json.loads((tiny_vpred_export / "scheduler.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler" and scheduler["prediction_type"] == "v_prediction"
    assert scheduler["beta_schedule"] == "scaled_linear" and scheduler["steps_offset"] == 1


def test_tokenizer_json_matches_transformers(tiny_export, tiny_model_dir):
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer
    ours = Tokenizer.from_file(str(tiny_export / "tokenizer" / "tokenizer.json"))
    theirs = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    for prompt in PROMPTS:
        assert ours.encode(prompt).ids == theirs(prompt).input_ids, prompt
    assert ours.encode(PROMPTS[0]).ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496,
                                           49407]


def test_dynamic_batch_and_size(tiny_export):
    rng = np.random.default_rng(1)
    dims = dict(B=2, H=48, W=80, S=154, C=4, CI=4, D=32, L=6, V=49408)   # latent 6x10, two prompt chunks
    for name in ("unet", "vae_encoder", "vae_decoder"):
        outputs = run(tiny_export, name, SPECS[name].sample(rng, **dims))
        shapes = SPECS[name].shapes(**dims)
        assert {k: v.shape for k, v in outputs.items()} == {k: shapes[k] for k in outputs}
    outputs = run(tiny_export, "text_encoder", SPECS["text_encoder"].sample(rng, **dict(dims, B=3, S=77)))
    assert outputs["hidden_states"].shape == (6, 3, 77, 32)
    np.testing.assert_array_equal(outputs["hidden_states"][-1], outputs["last_hidden_state"])


def test_fp16_export_runs_in_onnxruntime(tiny_model_dir, tiny_export, tmp_path):
    manifest = export(str(tiny_model_dir), tmp_path / "fp16", ExportOptions(fp16=True), progress=False)
    assert {c.precision for c in manifest.components.values()} == {"fp16"}
    for name, component in manifest.components.items():
        spec = half(spec_for(component, manifest.architecture))
        fp16, fp32 = tmp_path / "fp16" / f"{name}.onnx", tiny_export / f"{name}.onnx"
        assert weight_bytes(fp16) < 0.55 * weight_bytes(fp32)
        inputs = {i.name: i.type for i in session(fp16).get_inputs()}
        assert inputs == {t.name: f"tensor({'float' if t.dtype == 'float32' else t.dtype})" for t in spec.inputs}
        assert all(t.dtype == "float16" for t in spec.inputs if t.name not in ("input_ids", "timestep"))
    dims = dict(B=2, H=48, W=32, C=4)
    feeds = half(VAE_DECODER).sample(np.random.default_rng(2), **dims)
    ours = run(tmp_path / "fp16", "vae_decoder", feeds)["sample"]
    ref = run(tiny_export, "vae_decoder", {"latent_sample": feeds["latent_sample"].astype(np.float32)})
    ref = ref["sample"]
    assert ours.dtype == np.float16 and ours.shape == (2, 3, 48, 32)
    np.testing.assert_allclose(ours.astype(np.float32), ref, atol=half(VAE_DECODER).atol)


class _TracesDifferently(ox.VaeDecoder):
    """Exports fine but runs differently in eager torch: the parity check must catch it."""

    def forward(self, latent_sample):
        out = super().forward(latent_sample)
        return out if torch.jit.is_tracing() else out + 0.1


def test_failed_export_leaves_no_folder(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(ox.WRAPPERS, "vae_decoder", _TracesDifferently)
    out = tmp_path / "out"
    with pytest.raises(ParityError, match="vae_decoder") as e:
        export(str(tiny_model_dir), out, progress=False)
    assert [f.split(":")[0] for f in e.value.failures] == ["sample"]
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ModelFolderError):
        mf.read(out)


def test_failed_overwrite_keeps_the_old_export(tiny_model_dir, tiny_export, tmp_path, monkeypatch):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(tiny_export, out)
    with pytest.raises(ExportError, match="not empty"):
        export(str(tiny_model_dir), out, progress=False)
    monkeypatch.setitem(ox.WRAPPERS, "vae_decoder", _TracesDifferently)
    with pytest.raises(ParityError):
        export(str(tiny_model_dir), out, ExportOptions(overwrite=True), progress=False)
    assert mf.read(out).files == mf.read(tiny_export).files
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_external_data(source, tmp_path, monkeypatch):
    monkeypatch.setattr(ox, "EXTERNAL_DATA_OVER", 1 << 20)     # as if the tiny UNet were > 2 GB
    files, _ = ox.export_component(source, "unet", tmp_path)
    assert [f.name for f in files] == ["unet.onnx", "unet.onnx_data", "unet.weights.json"]
    assert files[0].stat().st_size < files[1].stat().st_size
    import onnx
    onnx.checker.check_model(str(files[0]))


def test_single_file_checkpoint(tiny_model_dir, tiny_export, tmp_path):
    checkpoint = to_single_file(tiny_model_dir, tmp_path / "model.safetensors")
    out = tmp_path / "out"
    manifest = export(str(checkpoint), out, ExportOptions(config=str(tiny_model_dir)), progress=False)
    assert manifest.source == str(checkpoint)
    assert manifest.architecture == mf.read(tiny_export).architecture
    feeds = SPECS["unet"].sample(np.random.default_rng(3), B=1, H=64, W=64, S=77, CI=4, D=32)
    np.testing.assert_allclose(run(out, "unet", feeds)["out_sample"],
                               run(tiny_export, "unet", feeds)["out_sample"], atol=1e-5)


def test_ckpt_checkpoint_loads_the_same_weights(tiny_model_dir, source, tmp_path):
    checkpoint = to_single_file(tiny_model_dir, tmp_path / "model.ckpt")
    loaded = load_source(str(checkpoint), progress=False)         # offline, with the configs sdrt writes
    for part in ("text_encoder", "unet", "vae"):
        ours, theirs = getattr(loaded, part).state_dict(), getattr(source, part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part
    assert loaded.scheduler_config["prediction_type"] == "epsilon" and not loaded.inpaint


def test_source_errors(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # no retries against the hub
    (tmp_path / "notes.txt").write_text("x")
    cases = {str(tmp_path / "missing.safetensors"): "no such checkpoint",
             str(tmp_path): "no model_index.json",
             str(tmp_path / "notes.txt"): "not a model",
             "no such thing": "not a hub id",
             "nobody/no-model": "could not fetch model_index.json"}
    for src, message in cases.items():
        with pytest.raises(ExportError, match=message) as e:
            load_source(src)
        assert src in str(e.value)
    checkpoint = to_single_file(tiny_model_dir, tmp_path / "model.safetensors")
    monkeypatch.setitem(sources.CONFIG_ARCHITECTURES, "sd1", ("sd15",))   # no config of the tiny shapes
    with pytest.raises(ExportError, match=r"UNet width 32, cross-attention 32, text encoder 32\); pass a "
                                          r"diffusers folder .* \(--config DIR\)"):
        load_source(str(checkpoint))


def test_vae_with_latents_mean_and_std_is_refused(tiny_model_dir, tmp_path):
    """A Playground v2.5-style VAE (diffusers de-normalises its latents with latents_mean/latents_std)."""
    import shutil
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((model / "vae" / "config.json").read_text())
    (model / "vae" / "config.json").write_text(json.dumps({**config, "latents_mean": [0.1, -0.2, 0.3, 0.0],
                                                           "latents_std": [0.9, 1.1, 1.0, 0.8]}))
    with pytest.raises(ExportError, match=f"{model}: its VAE config sets latents_mean and latents_std .*Playground "
                                          "v2.5.* not support"):
        export(str(model), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_out_folder(tiny_model_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export(str(tiny_model_dir), tmp_path / "file", progress=False)
    with pytest.raises(ExportError, match="opset"):
        export(str(tiny_model_dir), tmp_path / "new", ExportOptions(opset=13), progress=False)


def test_sdxl_text_embeds_pool_at_the_first_end_token():
    """SDXL's released text_encoder_2 config has eos_token_id 2, so transformers pools at the highest id: a
    textual-inversion token (>= 49408) there. The exported pooling takes the first end token (49407), as
    transformers does for a config with the right eos_token_id."""
    from types import SimpleNamespace

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sdrt.exporters.onnx import TextEncoder2
    torch.manual_seed(0)
    config = dict(vocab_size=49410, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  projection_dim=24, hidden_act="gelu", bos_token_id=0, pad_token_id=1)
    legacy = CLIPTextModelWithProjection(CLIPTextConfig(**config, eos_token_id=2)).eval()
    fixed = CLIPTextModelWithProjection(CLIPTextConfig(**config, eos_token_id=49407)).eval()
    fixed.load_state_dict(legacy.state_dict())
    wrapper = TextEncoder2(SimpleNamespace(text_encoder_2=legacy, tokenizer_2=SimpleNamespace(eos_token_id=49407)))
    ids = torch.tensor([[49406, 320, 49408, 49409, 1929, 49407] + [0] * 71,          # with embedding tokens
                        [49406, 320, 1929, 49407] + [0] * 73])
    with torch.no_grad():
        ours, theirs, old = wrapper(ids)[0], fixed(ids).text_embeds, legacy(ids).text_embeds
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours[1], old[1])                   # no new token: the same as before
    assert not torch.allclose(ours[0], old[0])
