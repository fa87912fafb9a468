"""Declarative specs of every exportable component: tensor names, symbolic shapes, parity tolerance.

Exporters and runtimes both read these; variants are made with ``dataclasses.replace``.
Shapes use symbols resolved at run time: ``B`` batch, ``H``/``W`` image size in pixels (``H/8`` is the
latent size), ``S`` token length (77 per prompt chunk), ``D`` text hidden size, ``L`` hidden-state count,
``C`` latent channels, ``CI`` UNet input channels, ``TC`` the guidance-embedding width of an LCM-distilled
UNet (``time_cond_proj_dim``). numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

CLIP_LENGTH = 77          # tokens per CLIP chunk, BOS and EOS included
VAE_FACTOR = 8            # pixels per latent cell


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def resolve(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(_resolve(d, dims) for d in self.shape)


def _resolve(dim: int | str, dims: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    if "/" in dim:                                    # "H/8": latent size of an image size, rounded up
        symbol, divisor = dim.split("/")              # as a stride-2 conv rounds an odd size ("H/16")
        return -(-dims[symbol] // int(divisor))
    if dim[0].isdigit():                              # "2C": a multiple of a symbol
        return int(dim[0]) * dims[dim[1:]]
    return dims[dim]


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: float = 1e-3                  # ONNX-vs-torch parity tolerance (fp32)
    opset: int = 17

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Symbolic axes of every input and output, in torch.onnx.export's format."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs)}

    def shapes(self, **dims: int) -> dict[str, tuple[int, ...]]:
        return {t.name: t.resolve(dims) for t in (*self.inputs, *self.outputs)}

    def profile(self, lo: dict, opt: dict, hi: dict) -> dict[str, tuple[tuple, tuple, tuple]]:
        """(min, opt, max) shape of every input, for engines with shape ranges (TensorRT, OpenVINO)."""
        return {t.name: (t.resolve(lo), t.resolve(opt), t.resolve(hi)) for t in self.inputs}

    def sample(self, rng: np.random.Generator, **dims: int) -> dict[str, np.ndarray]:
        """Random inputs of the resolved shapes, for export tracing and parity checks."""
        feeds = {}
        for t in self.inputs:
            shape = t.resolve(dims)
            if t.dtype.startswith("int"):
                feeds[t.name] = rng.integers(0, dims.get("V", 1000), shape).astype(t.dtype)
            elif t.name == "timestep":
                feeds[t.name] = rng.uniform(0, 999, shape).astype(t.dtype)
            elif t.name == "time_ids":                # sizes and crops in pixels (aesthetic scores: a few)
                feeds[t.name] = rng.integers(0, 1025, shape).astype(t.dtype)
            else:
                feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
        return feeds


TEXT_ENCODER = ComponentSpec(
    "text_encoder",
    inputs=(TensorSpec("input_ids", ("B", "S"), "int64"),),
    outputs=(TensorSpec("last_hidden_state", ("B", "S", "D")),
             TensorSpec("pooler_output", ("B", "D")),
             # final_layer_norm(h_i) for the embeddings and every layer: CLIP skip N is hidden_states[-N]
             TensorSpec("hidden_states", ("L", "B", "S", "D"))),
    atol=1e-4,
)

UNET = ComponentSpec(
    "unet",
    inputs=(TensorSpec("sample", ("B", "CI", "H/8", "W/8")),
            TensorSpec("timestep", ("B",)),
            TensorSpec("encoder_hidden_states", ("B", "S", "D"))),
    outputs=(TensorSpec("out_sample", ("B", "C", "H/8", "W/8")),),
    atol=2e-3,
)

VAE_ENCODER = ComponentSpec(
    "vae_encoder",
    inputs=(TensorSpec("sample", ("B", 3, "H", "W")),),
    outputs=(TensorSpec("latent_parameters", ("B", "2C", "H/8", "W/8")),),   # mean ⊕ logvar
    atol=2e-3,
)

VAE_DECODER = ComponentSpec(
    "vae_decoder",
    inputs=(TensorSpec("latent_sample", ("B", "C", "H/8", "W/8")),),
    outputs=(TensorSpec("sample", ("B", 3, "H", "W")),),
    atol=2e-3,
)

# an LCM-distilled UNet (``time_cond_proj_dim``): guidance enters as an embedding of the scale, not as CFG
UNET_LCM = replace(UNET, name="unet_lcm", inputs=UNET.inputs + (TensorSpec("timestep_cond", ("B", "TC")),))

# the tiny autoencoder (TAESD, diffusers' AutoencoderTiny): deterministic latents, no distribution to sample
VAE_ENCODER_TINY = ComponentSpec(
    "vae_encoder_tiny",
    inputs=(TensorSpec("sample", ("B", 3, "H", "W")),),
    outputs=(TensorSpec("latent_sample", ("B", "C", "H/8", "W/8")),),
    atol=2e-3,
)
VAE_DECODER_TINY = replace(VAE_DECODER, name="vae_decoder_tiny")

SPECS = {s.name: s for s in (TEXT_ENCODER, UNET, UNET_LCM, VAE_ENCODER, VAE_DECODER, VAE_ENCODER_TINY,
                             VAE_DECODER_TINY)}

# SDXL (Optimum's and the TensorRT demo's names). Its text encoders' hidden states are the raw layer outputs
# (no final LayerNorm: SDXL conditions on the penultimate one as it is); ``D2``/``L2`` are OpenCLIP-G's width
# and hidden-state count, ``P`` its projection (the pooled ``text_embeds``), ``T`` the number of time ids
# (6: original size, crop, target size; 5 for the refiner: original size, crop, aesthetic score).
TEXT_ENCODER_SDXL = replace(TEXT_ENCODER, name="text_encoder_sdxl")
TEXT_ENCODER_2 = ComponentSpec(
    "text_encoder_2",
    inputs=(TensorSpec("input_ids", ("B", "S"), "int64"),),
    outputs=(TensorSpec("text_embeds", ("B", "P")),
             TensorSpec("last_hidden_state", ("B", "S", "D2")),
             TensorSpec("hidden_states", ("L2", "B", "S", "D2"))),
    atol=1e-4,
)
SDXL_ADDED = (TensorSpec("text_embeds", ("B", "P")), TensorSpec("time_ids", ("B", "T")))   # added_cond_kwargs
UNET_SDXL = replace(UNET, name="unet_sdxl", inputs=UNET.inputs + SDXL_ADDED)
# component -> spec of an SDXL export (the refiner has no ``text_encoder``)
SDXL_SPECS = {"text_encoder": TEXT_ENCODER_SDXL, "text_encoder_2": TEXT_ENCODER_2, "unet": UNET_SDXL,
              "vae_encoder": VAE_ENCODER, "vae_decoder": VAE_DECODER}
# every spec a manifest component may name
ALL_SPECS = {**SPECS, **{s.name: s for s in SDXL_SPECS.values()}}


def residuals(down: str, mid: str, layout: tuple[tuple[int, int], ...]) -> tuple[TensorSpec, ...]:
    """The ControlNet residuals: ``<down>_<i>`` for every down-block one, then ``mid``.

    ``layout`` holds (channels, latent downsampling) of each, from the UNet config at export time
    (``sdrt.json``'s ``control_residuals``); SD 1.x/2.x have 12 down residuals and one mid residual.
    """
    def tensor(name: str, channels: int, down: int) -> TensorSpec:
        return TensorSpec(name, ("B", channels, f"H/{VAE_FACTOR * down}", f"W/{VAE_FACTOR * down}"))
    return (*(tensor(f"{down}_{i}", c, f) for i, (c, f) in enumerate(layout[:-1])), tensor(mid, *layout[-1]))


# the ControlNet graphs by spec name (a manifest's ``controlnets``/``unet_control``): SD 1.x/2.x, SDXL
CONTROL_ADDED = {"controlnet": (), "controlnet_sdxl": SDXL_ADDED}
CONTROL_BASES = {"unet_control": UNET, "unet_control_sdxl": UNET_SDXL}


def controlnet(layout: tuple[tuple[int, int], ...], name: str = "controlnet") -> ComponentSpec:
    """A ControlNet: the UNet's inputs plus the control image (RGB in [0, 1]) and its scale -> residuals.
    ``controlnet_sdxl`` (an SDXL ControlNet, ``addition_embed_type`` "text_time") also takes SDXL's
    ``text_embeds`` and ``time_ids``."""
    return ComponentSpec(
        name,
        inputs=(TensorSpec("sample", ("B", "C", "H/8", "W/8")),
                TensorSpec("timestep", ("B",)),
                TensorSpec("encoder_hidden_states", ("B", "S", "D")),
                TensorSpec("controlnet_cond", ("B", 3, "H", "W")),
                TensorSpec("conditioning_scale", (1,)),
                *CONTROL_ADDED[name]),
        outputs=residuals("down_block_res_samples", "mid_block_res_sample", layout),
        atol=2e-3,
    )


def unet_control(layout: tuple[tuple[int, int], ...], name: str = "unet_control") -> ComponentSpec:
    """The UNet (4- or 9-channel) that adds ControlNet residuals to its skip connections and mid block;
    ``unet_control_sdxl``: SDXL's UNet (its inputs, then the residuals)."""
    base = CONTROL_BASES[name]
    return replace(base, name=name,
                   inputs=base.inputs + residuals("down_block_additional_residuals", "mid_block_additional_residual",
                                                  layout))


def spec_for(component, architecture: dict) -> ComponentSpec:
    """The spec of a graph an export's manifest lists (a ``manifest.Component``, whose ``spec`` names it): one of
    ``ALL_SPECS``, or a ControlNet graph (``controlnet``, ``unet_control`` and their SDXL variants) with the
    residuals of the export's ``architecture["control_residuals"]``. Its tensors are float32; an fp16 component
    runs ``half(spec_for(...))``."""
    name = component.spec
    if name in CONTROL_ADDED or name in CONTROL_BASES:
        layout = tuple(tuple(r) for r in architecture["control_residuals"])
        return controlnet(layout, name) if name in CONTROL_ADDED else unet_control(layout, name)
    return ALL_SPECS[name]


FP32_INPUTS = ("timestep", "time_ids")     # inputs an fp16 graph keeps float32


def half(spec: ComponentSpec) -> ComponentSpec:
    """The fp16 variant of a spec: same names and shapes, float16 tensors, looser parity.

    ``timestep`` stays float32: fp16 cannot hold fractional timesteps near 999 (spacing 0.5); so do SDXL's
    ``time_ids`` (sizes in pixels, whose sinusoidal embedding the graph computes in fp32).
    """
    def f16(t: TensorSpec) -> TensorSpec:
        return replace(t, dtype="float16") if t.dtype == "float32" and t.name not in FP32_INPUTS else t
    return replace(spec, inputs=tuple(map(f16, spec.inputs)), outputs=tuple(map(f16, spec.outputs)),
                   atol=max(spec.atol * 20, 2e-2))
