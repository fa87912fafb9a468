"""SD 2.x on the tiny SD2-architecture model against diffusers: same seed, same sampler -> same image.

Reference: diffusers' StableDiffusionPipeline / StableDiffusionInpaintPipeline on the same folder (their SD 2
handling: the OpenCLIP-style text encoder, the tokenizer that pads with "!" = id 0 after the end token).
Prompts past 75 tokens are compared with diffusers fed per-chunk ``prompt_embeds``, each chunk tokenized and
padded by the model's own tokenizer (A1111's FrozenOpenCLIPEmbedderWithCustomWords pads the same way).
"""
from __future__ import annotations

import numpy as np
import pytest

import sdrt
from sdrt import manifest as mf

from sdrt.pipelines.conditioning import TextEncoder

from .test_parity import NEGATIVE, PROMPT, SIZE, STEPS, compare, init_image, mask_image, reference  # noqa: F401

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipe(tiny_sd2_export):
    return sdrt.load(tiny_sd2_export, runtime="onnxruntime", progress=False)


def test_manifest_records_sd2_and_the_pad_token(tiny_sd2_export):
    facts = mf.read(tiny_sd2_export).architecture
    assert facts["family"] == "sd2" and facts["prediction_type"] == "v_prediction"
    assert (facts["bos_token_id"], facts["eos_token_id"], facts["pad_token_id"]) == (49406, 49407, 0)


def test_chunks_pad_with_the_exported_pad_id(pipe, tiny_sd2_model_dir):
    ids, _ = TextEncoder(pipe.models.tokenizer, pipe.models.text_encoder).chunks("a red fox")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd2_model_dir).tokenizer(
        "a red fox", padding="max_length", max_length=77).input_ids
    assert ids.tolist() == [theirs]
    assert theirs[:6] == [49406, 320, 736, 3240, 49407, 0] and set(theirs[5:]) == {0}


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M Karras", "DDIM"])
def test_txt2img_v_prediction(pipe, tiny_sd2_model_dir, sampler):
    ours = pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, sampler=sampler,
                        seed=6)
    theirs = reference(tiny_sd2_model_dir, "StableDiffusionPipeline", sampler, 6, height=SIZE, width=SIZE)
    compare(f"sd2 v-prediction[{sampler}]", ours, theirs)


def test_long_prompt_matches_per_chunk_embeds(pipe, tiny_sd2_model_dir):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd2_model_dir, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)

    def embeds(chunks):
        ids = ref.tokenizer(chunks, padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert ids[-1, -1] == 0                              # padded with "!" (0), not the end token
        with torch.no_grad():
            return ref.text_encoder(ids)[0].reshape(1, -1, ref.text_encoder.config.hidden_size)

    words = "red fox " * 40                                   # 80 tokens: chunks of 75 and 5
    ours = pipe.txt2img(words, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, sampler="Euler",
                        seed=7)
    cond = embeds(["red fox " * 37 + "red", "fox " + "red fox " * 2])
    out = ref(prompt_embeds=cond, negative_prompt_embeds=torch.cat([embeds([NEGATIVE])] * 2, dim=1),
              num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np",
              generator=torch.Generator("cpu").manual_seed(7)).images
    compare("sd2 long prompt", ours, (out * 255).round().astype(np.int16))


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_inpaint_9_channel(tiny_sd2_inpaint_export, tiny_sd2_inpaint_model_dir, init_image, mask_image, sampler):
    """SD 2 inpainting (512, epsilon: also the epsilon variant of the architecture)."""
    image, mask = init_image, mask_image
    p = sdrt.load(tiny_sd2_inpaint_export, runtime="onnxruntime", progress=False)
    assert mf.read(tiny_sd2_inpaint_export).architecture["family"] == "sd2"
    ours = p.inpaint(image, mask, PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler=sampler, seed=9)
    theirs = reference(tiny_sd2_inpaint_model_dir, "StableDiffusionInpaintPipeline", sampler, 9, image=image,
                       mask_image=mask, height=SIZE, width=SIZE)
    compare(f"sd2 inpaint9[{sampler}]", ours, theirs)
