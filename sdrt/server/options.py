"""A1111's settings (GET/POST /options, per request ``override_settings``) that change what sdrt generates."""
from __future__ import annotations

from typing import Any, Callable

from ..errors import InvalidRequest
from ..pipelines.conditioning import EMPHASIS
from .preview import RENDERERS

RNG_SOURCES = {"CPU": "cpu", "GPU": "nv", "NV": "nv"}   # A1111 "GPU" on CUDA = Philox = its "NV" source
VAE_METHODS = ("Full", "TAESD")


def _int(key: str, lo: int, hi: int) -> Callable[[Any], int]:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value \
                or not lo <= value <= hi:
            raise InvalidRequest(f"{key} must be an integer in [{lo}, {hi}], not {value!r}")
        return int(value)
    return check


def _one_of(key: str, choices) -> Callable[[Any], str]:
    def check(value):
        if value not in choices:
            raise InvalidRequest(f"{key} must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return value
    return check


def _bool(key: str) -> Callable[[Any], bool]:
    def check(value):
        if not isinstance(value, bool):
            raise InvalidRequest(f"{key} must be true or false, not {value!r}")
        return value
    return check


# settings sdrt honours -> validator; other keys are stored and echoed back, as A1111 keeps them
VALIDATORS = {
    "CLIP_stop_at_last_layers": _int("CLIP_stop_at_last_layers", 1, 32),
    "emphasis": _one_of("emphasis", EMPHASIS),
    "comma_padding_backtrack": _int("comma_padding_backtrack", 0, 74),
    "randn_source": _one_of("randn_source", tuple(RNG_SOURCES)),
    "samples_format": _one_of("samples_format", ("png",)),
    "sd_vae": _one_of("sd_vae", ("Automatic", "None")),
    "live_previews_enable": _bool("live_previews_enable"),
    "show_progress_every_n_steps": _int("show_progress_every_n_steps", -1, 1000),   # -1: at the end only
    "show_progress_type": _one_of("show_progress_type", tuple(RENDERERS)),
    # A1111's "VAE type for decode/encode": TAESD is the export's tiny autoencoder (sdrt export --tiny-vae)
    "sd_vae_decode_method": _one_of("sd_vae_decode_method", VAE_METHODS),
    "sd_vae_encode_method": _one_of("sd_vae_encode_method", VAE_METHODS),
}
DEFAULTS = {"CLIP_stop_at_last_layers": 1, "emphasis": "Original", "comma_padding_backtrack": 20,
            "randn_source": "CPU", "samples_format": "png", "sd_vae": "Automatic", "eta_noise_seed_delta": 0,
            "live_previews_enable": True, "show_progress_every_n_steps": 10, "show_progress_type": "Approx cheap",
            "sd_vae_decode_method": "Full", "sd_vae_encode_method": "Full"}


def validated(values: dict, find_checkpoint: Callable[[str], Any]) -> dict:
    """``values`` checked; ``sd_model_checkpoint`` resolved to the checkpoint's title."""
    out = {}
    for key, value in values.items():
        if key == "sd_model_checkpoint":
            value = find_checkpoint(str(value)).title
        elif key in VALIDATORS:
            value = VALIDATORS[key](value)
        out[key] = value
    return out


def pipeline_settings(options: dict) -> dict:
    """The Request fields the settings give. sdrt runs one autoencoder per request: the decode method picks it
    (A1111's separate encode method is stored but follows the decoder)."""
    return {"clip_skip": options["CLIP_stop_at_last_layers"], "emphasis": options["emphasis"],
            "comma_padding_backtrack": options["comma_padding_backtrack"],
            "rng": RNG_SOURCES[options["randn_source"]],
            "vae": "tiny" if options.get("sd_vae_decode_method") == "TAESD" else "full"}
