"""Model-family detection from diffusers configs and from single-file weights, and the errors it gives."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.errors import ExportError                               # noqa: E402
from sdrt.exporters import architecture_facts, export, families   # noqa: E402
from sdrt.exporters.random_model import ARCHITECTURES, _pipeline  # noqa: E402
from sdrt.exporters.sources import load_source                    # noqa: E402

from .ldm import text_to_ldm, text_to_open_clip, to_single_file, unet_to_ldm, vae_to_ldm   # noqa: E402


def write_folder(folder, model_index: dict, **configs):
    """A diffusers folder of configs only: ``name=(file, dict)`` per component."""
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(model_index))
    for name, (file, config) in configs.items():
        (folder / name).mkdir()
        (folder / name / file).write_text(json.dumps(config))
    return folder


def unet_config(**kwargs):
    with torch.device("meta"):
        return dict(diffusers.UNet2DConditionModel(**dict(ARCHITECTURES["tiny"]["unet"], **kwargs)).config)


def test_tiny_folders(tiny_model_dir, tiny_inpaint_model_dir, tiny_vpred_model_dir, tiny_sd2_model_dir,
                      tiny_sd2_inpaint_model_dir):
    expected = {tiny_model_dir: ("sd1", False, "epsilon"), tiny_inpaint_model_dir: ("sd1", True, "epsilon"),
                tiny_vpred_model_dir: ("sd1", False, "v_prediction"),
                tiny_sd2_model_dir: ("sd2", False, "v_prediction"),
                tiny_sd2_inpaint_model_dir: ("sd2", True, "epsilon")}
    for folder, (family, inpaint, prediction) in expected.items():
        d = families.from_folder(folder)
        assert (d.family, d.inpaint, d.prediction_type) == (family, inpaint, prediction), folder


def test_unsupported_folders_name_their_family(tmp_path):
    sdxl_index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                  "text_encoder": ["transformers", "CLIPTextModel"],
                  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    sdxl_unet = unet_config(addition_embed_type="text_time", addition_time_embed_dim=8,
                            projection_class_embeddings_input_dim=80)
    refiner_index = dict(sdxl_index, _class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None])
    with torch.device("meta"):
        flux = dict(diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                                     num_attention_heads=2, joint_attention_dim=32,
                                                     pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).config)
    cases = {
        "flux": ("Flux .*FluxTransformer2DModel.* is not supported",
                 {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]},
                 dict(transformer=("config.json", flux))),
        "sd3": ("Stable Diffusion 3 .* is not supported",
                {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]},
                {}),
        "kandinsky": ("Kandinsky .* is not supported",
                      {"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                       "movq": ["diffusers", "VQModel"]},
                      dict(unet=("config.json", unet_config(addition_embed_type="image",
                                                            encoder_hid_dim=32)))),
        "alt": ("a model with a RobertaSeriesModelWithTransformation text encoder .* not supported",
                {"_class_name": "AltDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "text_encoder": ["diffusers", "RobertaSeriesModelWithTransformation"]},
                dict(unet=("config.json", unet_config()))),
    }
    for name, index in (("sdxl", sdxl_index), ("sdxl-refiner", refiner_index)):      # supported: detected only
        assert families.from_folder(write_folder(tmp_path / name, index, unet=("config.json", sdxl_unet))).family == name
    for name, (message, index, configs) in cases.items():
        folder = write_folder(tmp_path / name, index, **configs)
        if name != "alt":
            assert families.from_folder(folder).family == name
        with pytest.raises(ExportError, match=message) as e:
            export(str(folder), tmp_path / f"out-{name}", progress=False)    # before any weight is read
        assert str(folder) in str(e.value)
        assert not (tmp_path / f"out-{name}").exists()


def test_hub_ids_are_detected_from_their_configs_first(tmp_path, monkeypatch):
    """A hub Flux is refused after fetching only its small JSON files, before any weight."""
    import shutil

    import huggingface_hub
    repo = write_folder(tmp_path / "repo", {"_class_name": "FluxPipeline",
                                            "transformer": ["diffusers", "FluxTransformer2DModel"],
                                            "text_encoder": ["transformers", "CLIPTextModel"]},
                        transformer=("config.json", {"_class_name": "FluxTransformer2DModel"}))
    snapshot, fetched = tmp_path / "snapshots" / "0123abcd", []

    def download(repo_id, filename, revision=None, **kwargs):
        fetched.append(filename)
        if not (repo / filename).is_file():
            raise huggingface_hub.errors.EntryNotFoundError(filename)
        (snapshot / filename).parent.mkdir(parents=True, exist_ok=True)
        return str(shutil.copy(repo / filename, snapshot / filename))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(ExportError, match="someone/flux-model: Flux .* not supported"):
        load_source("someone/flux-model", progress=False)
    assert fetched == ["model_index.json", "transformer/config.json", "text_encoder/config.json"]   # the last absent


def test_single_files_detected_offline(tiny_model_dir, tiny_sd2_model_dir, tiny_sd2_inpaint_model_dir, tmp_path):
    expected = {tiny_model_dir: ("sd1", False, "epsilon"), tiny_sd2_model_dir: ("sd2", False, None),
                tiny_sd2_inpaint_model_dir: ("sd2", True, "epsilon")}        # None: not stated, to probe
    for i, (folder, (family, inpaint, prediction)) in enumerate(expected.items()):
        checkpoint = to_single_file(folder, tmp_path / f"{i}.safetensors")
        d = families.from_checkpoint(*families.read_checkpoint(checkpoint))
        assert (d.family, d.inpaint, d.prediction_type) == (family, inpaint, prediction)
    # SD 2.0-base's global_step says epsilon (diffusers' rule); a .ckpt keeps it beside the state dict
    shapes, _ = families.read_checkpoint(tmp_path / "1.safetensors")
    assert families.from_checkpoint(shapes, families.SD2_BASE_STEP).prediction_type == "epsilon"
    assert families.from_checkpoint({**shapes, "v_pred": ()}, families.SD2_BASE_STEP).prediction_type == "v_prediction"


def with_v_pred_key(checkpoint):
    from safetensors.torch import load_file, save_file
    save_file({**load_file(checkpoint), "v_pred": torch.zeros(0)}, checkpoint)
    return checkpoint


def test_sd2_single_file_loads_the_same_weights_offline(tiny_sd2_model_dir, tmp_path, monkeypatch):
    """No --config: sdrt writes the tiny-sd2 configs itself (the same path as a real SD 2.1 file)."""
    checkpoint = with_v_pred_key(to_single_file(tiny_sd2_model_dir, tmp_path / "sd2.safetensors"))
    monkeypatch.setattr(families, "predicts_v", None)             # the file says it: no probe
    loaded = load_source(str(checkpoint), progress=False)
    folder = load_source(str(tiny_sd2_model_dir), progress=False)
    for part in ("text_encoder", "unet", "vae"):
        ours, theirs = getattr(loaded, part).state_dict(), getattr(folder, part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part
    assert loaded.tokenizer.pad_token_id == 0 and loaded.prediction_type == "v_prediction"
    assert loaded.detected.family == "sd2" and loaded.text_encoder.config.hidden_act == "gelu"


def test_unstated_prediction_type_is_probed(tiny_sd2_model_dir, tmp_path, monkeypatch):
    checkpoint = to_single_file(tiny_sd2_model_dir, tmp_path / "sd2.safetensors")
    probed = []
    monkeypatch.setattr(families, "predicts_v", lambda unet: probed.append(unet) or False)
    loaded = load_source(str(checkpoint), progress=False)
    assert probed == [loaded.unet] and loaded.prediction_type == "epsilon"


def test_predicts_v_is_a1111s_test(tiny_sd2_model_dir):
    """An output far below the input at t=999 is v (about -x0); about the input is epsilon (about the noise)."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_sd2_model_dir, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        for bias, v in ((0.5, False), (-0.4, False), (-0.6, True), (-3.0, True)):   # threshold: mean < 0.5 - 1
            unet.conv_out.bias.fill_(bias)
            assert families.predicts_v(unet) is v, bias


def real_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """The weight names and shapes of a full-size checkpoint of ``arch`` (meta tensors: nothing allocated)."""
    with torch.device("meta"):
        pipe = _pipeline(arch, False, None)
    unet = unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config))
    text = pipe.text_encoder.state_dict()
    text = (text_to_open_clip(text, pipe.text_encoder.config.to_dict()) if arch.startswith("sd2")
            else text_to_ldm(text))
    return {k: tuple(v.shape) for k, v in {**unet, **text}.items()}


def test_released_architectures():
    """The configs sdrt writes for SD 1.5 / 2.1 files give the released checkpoints' key shapes."""
    sd15, sd21 = real_shapes("sd15"), real_shapes("sd21")
    attn = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    proj = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert sd15[attn] == (320, 768) and sd15[proj] == (320, 320, 1, 1)      # SD 1: conv projections
    assert sd21[attn] == (320, 1024) and sd21[proj] == (320, 320)           # SD 2: linear projections
    assert sd21["cond_stage_model.model.token_embedding.weight"] == (49408, 1024)
    assert sd21["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"] == (3072, 1024)
    assert families.from_checkpoint(sd15).family == "sd1"
    assert families.from_checkpoint(sd21) == families.Detected("sd2", False, None,
                                                              detail="cond_stage_model.model.* (OpenCLIP)")
    assert families.signature(sd21) == (320, 1024, 1024) and families.signature(sd15) == (320, 768, 768)
    assert ARCHITECTURES["sd21"]["unet"]["attention_head_dim"] == (5, 10, 20, 20)    # 64-wide heads


def sgm_state(arch: str) -> dict:
    """A full-size SGM checkpoint of the SDXL ``arch`` sdrt writes configs for, as meta tensors."""
    from sdrt.exporters.random_model import _sdxl_pipeline
    with torch.device("meta"):
        pipe = _sdxl_pipeline(arch, False, None)
    state = {**unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)),
             **vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config))}
    bigg = pipe.text_encoder_2
    if pipe.text_encoder is None:
        return state | text_to_open_clip(bigg.state_dict(), bigg.config.to_dict(), "conditioner.embedders.0.model.")
    return (state | text_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer.")
            | text_to_open_clip(bigg.state_dict(), bigg.config.to_dict(), "conditioner.embedders.1.model."))


def test_released_sdxl_architectures():
    """The configs sdrt writes for SDXL base/refiner files give the released checkpoints' key shapes, and
    diffusers' own detection names them xl_base / xl_refiner."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    base, refiner = sgm_state("sdxl"), sgm_state("sdxl-refiner")
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    unet = "model.diffusion_model."
    assert shapes[unet + "label_emb.0.0.weight"] == (1280, 2816)
    assert shapes[unet + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert shapes[unet + "output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert shapes["conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight"] == (3072, 768)
    assert tuple(refiner[unet + "label_emb.0.0.weight"].shape) == (1536, 2560)
    assert tuple(refiner[unet + "input_blocks.4.1.transformer_blocks.3.attn2.to_k.weight"].shape) == (768, 1280)
    assert (infer_diffusers_model_type(base), infer_diffusers_model_type(refiner)) == ("xl_base", "xl_refiner")
    for state, family, signature in ((base, "sdxl", (320, 2048, 768)), (refiner, "sdxl-refiner", (384, 1280, 1280))):
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        assert families.from_checkpoint(shapes) == families.Detected(family, False, "epsilon",
                                                                    detail="conditioner.embedders.* weights")
        assert families.signature(shapes) == signature


def test_unsupported_single_files(tmp_path):
    from safetensors.torch import save_file
    def z():
        return torch.zeros(1)
    cases = {
        "sdxl": ({"conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": z(),
                  "conditioner.embedders.1.model.positional_embedding": z(),
                  "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)},
                 r"a Stable Diffusion XL checkpoint of shapes sdrt has no config for \(UNet width 320"),
        "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": z()}, "Flux .* not supported"),
        "sd3": ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": z()},
                "Stable Diffusion 3 .* not supported"),
        "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": z()}, "a LoRA, not a model"),
        "x4": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(256, 7, 3, 3)}, "x4 upscaler"),
    }
    for name, (state, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state, path)
        with pytest.raises(ExportError, match=message) as e:
            load_source(str(path), progress=False)
        assert str(path) in str(e.value)
    (tmp_path / "torn.ckpt").write_bytes(b"PK\x03\x04 not a whole file")
    with pytest.raises(ExportError, match="torn.ckpt: not a readable checkpoint"):
        load_source(str(tmp_path / "torn.ckpt"), progress=False)


def test_architecture_facts_of_a_single_file(tiny_sd2_inpaint_model_dir, tmp_path):
    """The manifest's architecture facts of an SD 2 inpainting file (the export itself is tested on folders)."""
    checkpoint = to_single_file(tiny_sd2_inpaint_model_dir, tmp_path / "inpaint.safetensors")
    facts = architecture_facts(load_source(str(checkpoint), progress=False))
    assert (facts["family"], facts["inpaint"], facts["prediction_type"], facts["pad_token_id"]) == \
        ("sd2", True, "epsilon", 0)
    assert facts == architecture_facts(load_source(str(tiny_sd2_inpaint_model_dir), progress=False))
