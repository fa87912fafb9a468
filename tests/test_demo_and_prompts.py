"""`sdrt demo` end to end, the long-prompt warning, and CLI errors for a folder that is not an export."""
from __future__ import annotations

import logging

import numpy as np
import pytest

import sdrt
from sdrt.cli import main


def test_demo_runs_offline_and_prints_timings(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "3", "--size", "64"]) == 0
    out = capsys.readouterr().out
    for words in ("export + parity", "txt2img", "img2img", "unet", "vae_decoder", "text_encoder", "ms"):
        assert words in out
    assert (tmp_path / "sdrt-demo.png").is_file() and (tmp_path / "export" / "sdrt.json").is_file()


def test_long_prompt_is_truncated_with_a_warning(tiny_export, caplog):
    pipe = sdrt.load(tiny_export, progress=False)
    words = " ".join(f"word{i}" for i in range(60))                  # well over 75 CLIP tokens
    ids = pipe.models.tokenizer([words])
    assert ids.shape == (1, 77) and ids[0, 0] == 49406 and ids[0, -1] == 49407
    with caplog.at_level(logging.WARNING):
        pipe.txt2img(words, width=64, height=64, steps=2, seed=1)
    assert any("truncated" in r.message for r in caplog.records)


def test_tokenizer_matches_transformers(tiny_export, tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    ours = sdrt.load(tiny_export, progress=False).models.tokenizer
    prompts = ["a photo of a cat", "", "Ünïcode, émojis 🐱 and CAPS!", "word " * 100]
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ours(prompts), np.array(expected))


def test_cli_rejects_a_folder_that_is_not_an_export(tmp_path, capsys):
    code = main(["generate", str(tmp_path), "--prompt", "x", "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "not an sdrt export" in err and "sdrt export" in err
