"""A1111 prompt syntax: the parser against A1111's documented examples, chunking, and the resulting
images against diffusers fed the equivalent ``prompt_embeds`` (weights, long prompts, BREAK, CLIP skip,
prompt editing).

The reference embeddings are computed here with transformers' CLIPTokenizer and the torch text encoder,
from chunk contents written out by hand, not with sdrt's tokenizer or packing.
"""
from __future__ import annotations

import numpy as np
import pytest

import sdrt
from sdrt.errors import InvalidRequest
from sdrt.pipelines import prompts
from sdrt.pipelines.conditioning import CHUNK, Conditioning, pack
from sdrt.pipelines.denoisers import ModelDenoiser, guided

from .conftest import WORST

SIZE, STEPS, TOLERANCE = 64, 8, 2
NEGATIVE = "blurry"


# -- the parser, on A1111's own examples (modules/prompt_parser.py docstrings) ---------------------------

@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("[[x]] \\\\ y)", [("x", 1 / 1.21), (" \\ y)", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_attention(text, expected):
    got = prompts.parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-9)


@pytest.mark.parametrize("text, expected", [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    ("[fe|]male", [(i, "female" if i % 2 else "male") for i in range(1, 11)]),
    ("[fe|||]male", [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
    ("[remove::4] stays", [(4, "remove stays"), (10, " stays")]),
])
def test_schedule(text, expected):
    assert prompts.schedule(text, 10) == expected


@pytest.mark.parametrize("text, expected", [
    ("a [b:.5] c", [(10, "a b c")]),                  # A1111's examples for a 10-step hires pass after 10
    ("a [b:1.5] c", [(5, "a  c"), (10, "a b c")]),
    ("a [b:15] c", [(5, "a  c"), (10, "a b c")]),     # integers count on from the first pass's 10 steps
])
def test_schedule_in_a_hires_pass(text, expected):
    assert prompts.schedule(text, 10, first_pass_steps=10) == expected


def test_at_step_uses_the_entry_whose_end_is_not_passed():
    entries = prompts.schedule("a [b:3]", 10)          # A1111: evaluations 0..3 see "a ", 4.. see "a b"
    assert [prompts.at_step(entries, s) for s in range(6)] == [0, 0, 0, 0, 1, 1]


def test_and_and_extra_networks():
    assert prompts.split_and("a cat AND a dog :0.5 AND x:-1") == [("a cat", 1.0), (" a dog", 0.5), (" x", -1.0)]
    assert prompts.split_and("ANDROID cat") == [("ANDROID cat", 1.0)]
    text, nets = prompts.extra_networks("a <lora:film grain:0.7>cat<hypernet:x:1>")
    assert text == "a cat"
    assert [(n.kind, n.args) for n in nets] == [("lora", ("film grain", "0.7")), ("hypernet", ("x", "1"))]


# -- packing tokens into 75-token chunks --------------------------------------------------------------

COMMA = 267


def test_pack_splits_at_75_and_at_break():
    chunks = pack([(list(range(80)), 1.0), None, ([500], 1.2)], COMMA, 20)
    assert [ids for ids, _ in chunks] == [list(range(75)), list(range(75, 80)), [500]]
    assert chunks[2][1] == [1.2]
    assert pack([(list(range(75)), 1.0), None], COMMA, 20) == [(list(range(75)), [1.0] * 75)]
    assert pack([None, ([1], 1.0)], COMMA, 20) == [([], []), ([1], [1.0])]
    assert pack([([], 1.0)], COMMA, 20) == [([], [])]


def test_pack_moves_the_text_after_a_recent_comma():
    ids = list(range(1000, 1070)) + [COMMA] + list(range(2000, 2010))   # comma at 70, chunk full at 75
    first, second = pack([(ids, 1.0)], COMMA, 20)
    assert first[0] == ids[:71] and second[0] == ids[71:]
    first, second = pack([(ids, 1.0)], COMMA, 0)                           # backtrack off: cut at 75
    assert first[0] == ids[:75] and second[0] == ids[75:]
    far = list(range(1000, 1010)) + [COMMA] + list(range(2000, 2070))     # comma 65 tokens back: too far
    assert pack([(far, 1.0)], COMMA, 20)[0][0] == far[:75]


# -- the denoiser: AND weights and separate calls for a longer negative prompt --------------------------

class FakeUnet:
    """Returns each row's mean cross-attention input as its 'noise', and records the call sizes."""
    def __init__(self):
        self.calls = []

    def run(self, feeds):
        c = feeds["encoder_hidden_states"]
        self.calls.append(c.shape)
        return {"out_sample": np.broadcast_to(c.mean(axis=(1, 2))[:, None, None, None],
                                              feeds["sample"].shape).astype(np.float32)}


def test_and_weights_and_call_grouping():
    unet, log_sigmas = FakeUnet(), np.log(np.linspace(0.03, 15, 1000))
    u, a, b = (np.full((1, n, 4), v, np.float32) for n, v in ((154, 1.0), (77, 2.0), (77, 5.0)))
    d = ModelDenoiser(unet, log_sigmas, lambda step: [u, a, b])
    cfg = guided(d, 7.0, [1.0, 0.5])
    x = np.zeros((1, 4, 2, 2), np.float32)
    out = cfg(x, 1.0)
    # x0 = x - sigma * eps per block; guidance: u + 7 (1 (a - u) + 0.5 (b - u)) on x0 = -eps
    np.testing.assert_allclose(out, -(1.0 + 7 * (1.0 * (2 - 1) + 0.5 * (5 - 1))))
    assert unet.calls == [(1, 154, 4), (2, 77, 4)]                # uncond alone, the two conds together
    assert d.step == 1


def test_conditioning_schedules_per_evaluation():
    def encode(text):
        return np.full((77, 2), {"a ": 1.0, "a b": 2.0, "neg": 3.0, " x": 4.0}[text], np.float32)
    cond = Conditioning.build(encode, "a [b:2] AND x:0.5", "neg", steps=4, guidance=True, batch_size=2)
    assert cond.weights == [1.0, 0.5]
    assert [float(cond.blocks(s)[1][0, 0, 0]) for s in range(4)] == [1.0, 1.0, 1.0, 2.0]
    assert all(b.shape == (2, 77, 2) for b in cond.blocks(0))
    assert [float(b[0, 0, 0]) for b in cond.blocks(0)] == [3.0, 1.0, 4.0]


# -- images against diffusers fed the equivalent prompt embeddings --------------------------------------

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipe(tiny_export):
    return sdrt.load(tiny_export, runtime="onnxruntime", progress=False)


@pytest.fixture(scope="module")
def reference_pipe(tiny_model_dir):
    p = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                          requires_safety_checker=False)
    p.scheduler = diffusers.EulerDiscreteScheduler.from_config(p.scheduler.config)
    p.set_progress_bar_config(disable=True)
    return p


def embeds(ref, chunks: list[list[tuple[str, float]]], clip_skip: int = 1) -> torch.Tensor:
    """A1111's conditioning from chunk contents given by hand: each chunk BOS + tokens + EOS padding,
    CLIP per chunk, outputs times weights rescaled to the chunk's original mean, concatenated."""
    tok, te = ref.tokenizer, ref.text_encoder
    out = []
    for chunk in chunks:
        ids, weights = [tok.bos_token_id], [1.0]
        for text, w in chunk:
            piece = tok(text, add_special_tokens=False).input_ids
            ids += piece
            weights += [w] * len(piece)
        ids += [tok.eos_token_id] * (77 - len(ids))
        weights += [1.0] * (77 - len(weights))
        with torch.no_grad():
            res = te(torch.tensor([ids]), output_hidden_states=True)
            z = getattr(te, "text_model", te).final_layer_norm(res.hidden_states[-clip_skip])[0]
        scaled = z * torch.tensor(weights)[:, None]
        out.append(scaled * (z.mean() / scaled.mean()))
    return torch.cat(out)[None]


def diffusers_image(ref, seed: int, **kwargs) -> np.ndarray:
    out = ref(num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np",
              generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
    return (out * 255).round().astype(np.int16)


def compare(name, ours, theirs):
    diff = int(np.abs(np.asarray(ours.images[0], np.int16)[None] - theirs).max())
    WORST[name] = diff
    assert diff <= TOLERANCE, f"{name}: max pixel difference {diff}/255 > {TOLERANCE}"


def sdrt_image(pipe, prompt, seed, negative=NEGATIVE, **kwargs):
    return pipe.txt2img(prompt, negative_prompt=negative, width=SIZE, height=SIZE, steps=STEPS,
                        sampler="Euler", seed=seed, **kwargs)


def test_weights_match_diffusers_with_prompt_embeds(pipe, reference_pipe):
    ours = sdrt_image(pipe, "a (red:1.3) fox in the [snow]", 21)
    cond = embeds(reference_pipe, [[("a ", 1.0), ("red", 1.3), (" fox in the ", 1.0), ("snow", 1 / 1.1)]])
    theirs = diffusers_image(reference_pipe, 21, prompt_embeds=cond,
                             negative_prompt_embeds=embeds(reference_pipe, [[(NEGATIVE, 1.0)]]))
    compare("prompt weights", ours, theirs)


def test_long_prompt_and_break_match_diffusers(pipe, reference_pipe):
    words = "red fox " * 40                                              # 80 tokens: chunks of 75 and 5
    ours = sdrt_image(pipe, words, 22, negative="blurry BREAK (ugly:1.4)")
    cond = embeds(reference_pipe, [[("red fox " * 37 + "red", 1.0)], [("fox " + "red fox " * 2, 1.0)]])
    uncond = embeds(reference_pipe, [[("blurry", 1.0)], [("ugly", 1.4)]])
    theirs = diffusers_image(reference_pipe, 22, prompt_embeds=cond, negative_prompt_embeds=uncond)
    compare("long prompt + BREAK", ours, theirs)


def test_clip_skip_matches_diffusers(pipe, reference_pipe):
    # A1111's "Clip skip: 2" is diffusers' clip_skip=1 (one layer skipped)
    # (diffusers 0.42's own clip_skip fails with transformers 5, so its embeddings are built here)
    ours = sdrt_image(pipe, "a red (fox:0.8)", 23, clip_skip=2)
    theirs = diffusers_image(reference_pipe, 23,
                             prompt_embeds=embeds(reference_pipe, [[("a red ", 1.0), ("fox", 0.8)]], clip_skip=2),
                             negative_prompt_embeds=embeds(reference_pipe, [[(NEGATIVE, 1.0)]], clip_skip=2))
    compare("clip skip 2", ours, theirs)
    assert "Clip skip: 2" in ours.infotexts[0]


def test_prompt_editing_matches_diffusers_switching_embeds(pipe, reference_pipe):
    ours = sdrt_image(pipe, "a [fox:cat:4] in the snow", 24)
    fox, cat = (embeds(reference_pipe, [[(f"a {w} in the snow", 1.0)]]) for w in ("fox", "cat"))
    uncond = embeds(reference_pipe, [[(NEGATIVE, 1.0)]])

    def switch(p, i, t, tensors):          # A1111: evaluations 0..4 use "fox", 5.. use "cat"
        return {"prompt_embeds": torch.cat([uncond, cat])} if i == 4 else {}
    theirs = diffusers_image(reference_pipe, 24, prompt_embeds=fox, negative_prompt_embeds=uncond,
                             callback_on_step_end=switch, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    compare("prompt editing", ours, theirs)


def test_unbalanced_and_empty_prompts_generate(pipe):
    for prompt in ("((a fox [in (the snow", "a fox)]] \\", ""):
        assert len(sdrt_image(pipe, prompt, 1, negative="")) == 1


def test_plain_prompt_is_unchanged_by_the_parser(pipe):
    a = np.asarray(sdrt_image(pipe, "a red fox", 2).images[0])
    b = np.asarray(sdrt_image(pipe, "a red fox", 2, emphasis="None").images[0])
    assert (a == b).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"clip_skip": 0}, "clip_skip must be between 1 and 5"),
    ({"clip_skip": 6}, "clip_skip must be between 1 and 5"),
    ({"emphasis": "Loud"}, "emphasis must be one of"),
    ({"prompt": "a <hypernet:x:1> fox"}, "extra networks sdrt does not support: ['hypernet']"),
])
def test_bad_prompt_options(pipe, kwargs, message):
    prompt = kwargs.pop("prompt", "a fox")
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        sdrt_image(pipe, prompt, 1, **kwargs)
