"""torch -> ONNX for each component spec, and the ONNX Runtime-vs-torch parity check that follows it.

Each component is a small ``nn.Module`` whose ``forward`` takes the spec's inputs in order and returns its
outputs in order, so tracing, dynamic axes and the parity check all read names from ``sdrt.specs``.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import ExportError, ParityError
from ..specs import CLIP_LENGTH, FP32_INPUTS, SDXL_SPECS, SPECS, VAE_FACTOR, ComponentSpec, half
from .sources import Source
from .weight_map import write_weight_map

log = logging.getLogger(__name__)

EXTERNAL_DATA_OVER = 2**31 - 2**26      # protobuf's 2 GiB limit, less headroom for the graph itself
# sinusoidal timestep embeddings (and SDXL's of its time ids): kept fp32
TIME_PROJ_NODES = ("/unet/time_proj/", "/controlnet/time_proj/", "/unet/add_time_proj/",
                   "/controlnet/add_time_proj/")
# Kept fp32 in fp16 graphs, where fp16 overflows into black images: attention softmax, and GroupNorm, which
# the TorchScript exporter emits as Reshape -> InstanceNormalization -> Reshape (statistics of a group)
FP32_OPS = ("Softmax", "InstanceNormalization")


class TextEncoder(nn.Module):
    """input_ids -> last_hidden_state, pooler_output, final_layer_norm of every hidden state (CLIP skip)."""

    def __init__(self, source: Source):
        super().__init__()
        self.clip = source.text_encoder

    def forward(self, input_ids):
        out = self.clip(input_ids, output_hidden_states=True)
        norm = getattr(self.clip, "text_model", self.clip).final_layer_norm   # transformers 4.x nests it
        hidden_states = torch.stack([norm(h) for h in out.hidden_states])
        return out.last_hidden_state, out.pooler_output, hidden_states


class Unet(nn.Module):
    """sample, timestep (B,), encoder_hidden_states -> out_sample (4- or 9-channel input alike)."""

    def __init__(self, source: Source):
        super().__init__()
        self.unet = source.unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class UnetLcm(Unet):
    """An LCM-distilled UNet: also ``timestep_cond``, the embedding of the guidance scale (Luo et al. 2023)."""

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond):
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False)[0]


class VaeEncoder(nn.Module):
    """Image in [-1, 1] -> the diagonal Gaussian's parameters (mean ⊕ logvar), unscaled."""

    def __init__(self, source: Source):
        super().__init__()
        self.vae = source.vae

    def forward(self, sample):
        h = self.vae.encoder(sample)
        return h if self.vae.quant_conv is None else self.vae.quant_conv(h)


class VaeDecoder(nn.Module):
    """Latents (already divided by the scaling factor by the pipeline) -> image in about [-1, 1]."""

    def __init__(self, source: Source):
        super().__init__()
        self.vae = source.vae

    def forward(self, latent_sample):
        z = latent_sample if self.vae.post_quant_conv is None else self.vae.post_quant_conv(latent_sample)
        return self.vae.decoder(z)


class VaeEncoderTiny(nn.Module):
    """The tiny autoencoder's encoder (TAESD): image in [-1, 1] -> latents, already in the UNet's latent space
    (its scaling factor is 1.0); nothing to sample."""

    def __init__(self, source: Source):
        super().__init__()
        self.vae = source.tiny_vae

    def forward(self, sample):
        return self.vae.encoder(sample)


class VaeDecoderTiny(nn.Module):
    """The tiny autoencoder's decoder (TAESD): latents (divided by its scaling factor) -> image in [-1, 1]."""

    def __init__(self, source: Source):
        super().__init__()
        self.vae = source.tiny_vae

    def forward(self, latent_sample):
        return self.vae.decoder(latent_sample)


WRAPPERS: dict[str, type[nn.Module]] = {"text_encoder": TextEncoder, "unet": Unet, "unet_lcm": UnetLcm,
                                        "vae_encoder": VaeEncoder, "vae_decoder": VaeDecoder,
                                        "vae_encoder_tiny": VaeEncoderTiny, "vae_decoder_tiny": VaeDecoderTiny}


def lcm(source: Source) -> bool:
    """Whether the UNet takes a guidance-scale embedding (``time_cond_proj_dim``), as LCM-distilled UNets do."""
    return source.unet.config.get("time_cond_proj_dim") is not None


class TextEncoderSDXL(nn.Module):
    """SDXL's CLIP ViT-L: input_ids -> last_hidden_state, pooler_output, every raw hidden state (SDXL
    conditions on the penultimate layer's output without the final LayerNorm)."""

    def __init__(self, source: Source):
        super().__init__()
        self.clip = source.text_encoder

    def forward(self, input_ids):
        out = self.clip(input_ids, output_hidden_states=True)
        return out.last_hidden_state, out.pooler_output, torch.stack(out.hidden_states)


class TextEncoder2(nn.Module):
    """SDXL's OpenCLIP ViT-bigG with projection: input_ids -> text_embeds (pooled, projected),
    last_hidden_state, every raw hidden state.

    Pooled at the first end-of-text token, as OpenCLIP and A1111 pool: transformers pools at the highest
    token id when the config's ``eos_token_id`` is 2, as SDXL's text_encoder_2 config says, which would pick
    a textual-inversion token (ids past the vocabulary) instead. The same position for every other prompt.
    """

    def __init__(self, source: Source):
        super().__init__()
        self.clip = source.text_encoder_2
        self.eos = source.tokenizer_2.eos_token_id

    def forward(self, input_ids):
        out = self.clip(input_ids, output_hidden_states=True)
        first_eos = (input_ids == self.eos).int().argmax(dim=-1)
        pooled = out.last_hidden_state[torch.arange(input_ids.shape[0]), first_eos]
        return self.clip.text_projection(pooled), out.last_hidden_state, torch.stack(out.hidden_states)


class UnetSDXL(nn.Module):
    """sample, timestep, encoder_hidden_states, text_embeds, time_ids -> out_sample (diffusers'
    ``added_cond_kwargs``: the pooled text embedding and the size/crop conditioning)."""

    def __init__(self, source: Source):
        super().__init__()
        self.unet = source.unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


SDXL_WRAPPERS: dict[str, type[nn.Module]] = {"text_encoder": TextEncoderSDXL, "text_encoder_2": TextEncoder2,
                                             "unet": UnetSDXL, "vae_encoder": VaeEncoder, "vae_decoder": VaeDecoder}


def components(source: Source) -> list[str]:
    """The components ``source`` exports, in order (the SDXL refiner has no ``text_encoder``; the tiny
    autoencoder's graphs come when the source has one)."""
    if source.sdxl:
        names = [name for name in SDXL_WRAPPERS if name != "text_encoder" or source.text_encoder is not None]
    else:
        names = ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    return names + (["vae_encoder_tiny", "vae_decoder_tiny"] if source.tiny_vae is not None else [])


def component_spec(source: Source, name: str) -> ComponentSpec:
    """The spec component ``name`` of ``source`` follows: SDXL's own, ``unet_lcm`` for an LCM-distilled UNet."""
    if source.sdxl and name in SDXL_SPECS:
        return SDXL_SPECS[name]
    return SPECS["unet_lcm" if name == "unet" and lcm(source) else name]


def wrapper(source: Source, name: str) -> type[nn.Module]:
    """The torch module exported as component ``name``."""
    if source.sdxl and name in SDXL_WRAPPERS:
        return SDXL_WRAPPERS[name]
    return WRAPPERS[component_spec(source, name).name]


def dims(source: Source, stage: str) -> dict[str, int]:
    """Values of the spec symbols: ``trace`` (batch 1, square) or ``check`` (batch 2, other size, 2 chunks).

    The latent sizes are deliberately NOT multiples of the UNet's downsampling: diffusers then passes
    explicit upsample sizes, so the traced graph serves every multiple of 8 px, as A1111 allows.
    """
    unet = source.unet.config
    text = (source.text_encoder or source.text_encoder_2).config
    step = VAE_FACTOR * 2 ** (len(unet.block_out_channels) - 1)
    fixed = dict(D=text.hidden_size, L=text.num_hidden_layers + 1, C=source.vae.config.latent_channels,
                 CI=unet.in_channels, V=text.vocab_size, TC=unet.get("time_cond_proj_dim") or 1)
    if source.sdxl:
        text_2 = source.text_encoder_2.config
        fixed |= dict(D=unet.cross_attention_dim, D2=text_2.hidden_size, L2=text_2.num_hidden_layers + 1,
                      P=text_2.projection_dim, T=time_id_count(source))
    if stage == "trace":
        return dict(fixed, B=1, H=2 * step + VAE_FACTOR, W=2 * step + VAE_FACTOR, S=CLIP_LENGTH)
    return dict(fixed, B=2, H=3 * step + VAE_FACTOR, W=2 * step, S=CLIP_LENGTH)


def time_id_count(source: Source) -> int:
    """How many time ids an SDXL UNet takes (6; 5 for the refiner): diffusers sizes its added embedding's
    input as addition_time_embed_dim * ids + the pooled text embedding's width."""
    unet, width = source.unet.config, source.text_encoder_2.config.projection_dim
    count, rest = divmod(unet.projection_class_embeddings_input_dim - width, unet.addition_time_embed_dim)
    if rest or count < 1:
        raise ExportError(f"{source.name}: the UNet's projection_class_embeddings_input_dim "
                          f"{unet.projection_class_embeddings_input_dim} is not text_encoder_2's projection_dim "
                          f"{width} plus whole time ids of {unet.addition_time_embed_dim}; not an SDXL model")
    return count


def check_dims(source: Source, name: str) -> dict[str, int]:
    """Parity-check sizes; the UNet also sees a two-chunk (154-token) prompt to exercise dynamic S."""
    d = dims(source, "check")
    return dict(d, S=2 * CLIP_LENGTH) if name.startswith("unet") else d


def export_component(source: Source, name: str, folder: Path, *, opset: int = 17, fp16: bool = False,
                     check_parity: bool = True, stem: str | None = None) -> tuple[list[Path], dict[str, float]]:
    """Export the component of spec ``name`` of ``source`` to ``folder/<stem or name>.onnx`` and check it
    against torch.

    Returns the files written (graph, external data when large, weight map) and the max diff of every output.
    """
    spec = component_spec(source, name)
    module = wrapper(source, name)(source).eval()
    path = folder / f"{stem or name}.onnx"
    rng = np.random.default_rng(0)
    files = export_onnx(module, spec, path, spec.sample(rng, **dims(source, "trace")), opset, fp16)
    files.append(write_weight_map(module, path, stem or name, fp16))
    diffs = {}
    if check_parity:
        feeds = spec.sample(rng, **check_dims(source, name))
        if "input_ids" in feeds:            # an EOS somewhere in each row, as tokenized prompts have
            ids = feeds["input_ids"]
            eos = (source.tokenizer or source.tokenizer_2).eos_token_id
            ids[np.arange(len(ids)), rng.integers(1, ids.shape[1], len(ids))] = eos
        diffs = parity(module, half(spec) if fp16 else spec, path, feeds)
        log.info("%s parity: %s", name, ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
    return files, diffs


def export_onnx(module: nn.Module, spec: ComponentSpec, path: Path, feeds: dict[str, np.ndarray],
                opset: int, fp16: bool) -> list[Path]:
    """Trace ``module`` on ``feeds`` into ``path`` (TorchScript exporter); returns the files written."""
    scratch = path.with_name(f".{path.stem}.trace")
    scratch.mkdir()
    traced = scratch / "model.onnx"
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")     # TracerWarnings on shape asserts; TorchScript exporter deprecated
        torch.onnx.export(module, args, str(traced), dynamo=False, opset_version=opset,
                          input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs],
                          dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)
    model = to_fp16(traced) if fp16 else onnx.load(str(traced))
    files = save(model, path)
    shutil.rmtree(scratch)
    return files


def to_fp16(path: Path) -> onnx.ModelProto:
    """float16 weights and I/O (``specs.half``), with the numerically sensitive ops kept fp32. ONNX Runtime's
    CPU EP runs ops it has no fp16 kernel for in fp32 (it inserts the Casts itself when loading).

    Kept fp32 (Casts around them): the sinusoidal timestep embedding (sin/cos of t·freq with t up to 999
    would be off by up to 0.5 rad in fp16; diffusers computes it in fp32 too), every ``FP32_OPS`` node, and
    the attention scores Q·Kᵀ feeding each softmax (diffusers' ``upcast_attention``: they overflow 65504).
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    graph = onnx.load(str(path), load_external_data=False).graph
    keep = [n.name for n in graph.node if n.name.startswith(TIME_PROJ_NODES)] + attention_scores(graph)
    model = convert_float_to_float16(str(path), keep_io_types=list(FP32_INPUTS), node_block_list=keep,
                                     op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS])
    drop_fp16_round_trips(model.graph)
    return model


def attention_scores(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes computing each Softmax's input: the Q·Kᵀ MatMul and any mask Add between them."""
    producer = {out: node for node in graph.node for out in node.output}
    names = []
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        step = producer.get(node.input[0])
        while step is not None and step.op_type in ("Add", "Mul", "Div", "MatMul"):
            names.append(step.name)
            step = None if step.op_type == "MatMul" else producer.get(step.input[0])
    return names


def drop_fp16_round_trips(graph: onnx.GraphProto) -> None:
    """Remove the Cast(fp16) -> Cast(fp32) pairs ``convert_float_to_float16`` puts between two fp32 nodes.

    onnxruntime 1.32's converter casts every kept node's output to fp16 and back, even when the next node is
    kept fp32 too, which rounds Q·Kᵀ (and t·freq) to fp16 before the softmax (the sine) after all.
    """
    def cast_to(node):
        return next(a.i for a in node.attribute if a.name == "to") if node.op_type == "Cast" else None
    producer = {out: node for node in graph.node for out in node.output}
    rename = {}                         # output of a Cast(fp32) undoing a Cast(fp16) -> the fp32 original
    for node in graph.node:
        first = producer.get(node.input[0]) if node.op_type == "Cast" else None
        if cast_to(node) == onnx.TensorProto.FLOAT and first is not None and \
                cast_to(first) == onnx.TensorProto.FLOAT16:
            rename[node.output[0]] = first.input[0]
    kept = [n for n in graph.node if n.output[0] not in rename]
    used = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    kept = [n for n in kept if n.op_type != "Cast" or n.output[0] in used]
    for node in kept:
        node.input[:] = [rename.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)


def save(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save ``model``; weights go to ``<name>_data`` next to it when the file would pass protobuf's 2 GiB."""
    if _tensor_bytes(model) < EXTERNAL_DATA_OVER:
        onnx.save_model(model, str(path))
        return [path]
    data = path.with_name(path.name + "_data")
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    data.chmod(path.stat().st_mode & 0o777)             # onnx 1.23 creates it 0600, unlike the graph
    return [path, data]


def _tensor_bytes(model: onnx.ModelProto) -> int:
    constants = (a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)
    return sum(len(t.raw_data) for t in (*model.graph.initializer, *constants))


def parity(module: nn.Module, spec: ComponentSpec, path: Path,
           feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Run torch and ONNX Runtime (CPU) on ``feeds``; raise ParityError listing every output over tolerance.

    An output passes when |onnx - torch| <= atol + atol·|torch| everywhere (np.isclose with rtol = atol).
    Returns the max absolute diff of every output.
    """
    feeds = {t.name: feeds[t.name].astype(t.dtype) for t in spec.inputs}    # fp16 specs round the inputs
    expected = run_torch(module, spec, feeds)
    actual = run_onnx(path, feeds)
    failures, diffs = [], {}
    for t in spec.outputs:
        e, a = expected[t.name], actual[t.name].astype(np.float32)
        if a.shape != e.shape:
            failures.append(f"{t.name}: shape {a.shape}, torch gives {e.shape}")
            continue
        diff = np.abs(a - e)
        diffs[t.name] = float(np.nanmax(diff)) if np.isfinite(diff).any() else float("nan")
        bad = ~(diff <= spec.atol * (1 + np.abs(e)))                       # NaN counts as bad
        if bad.any():
            failures.append(f"{t.name}: max diff {np.nanmax(diff):.3g} > atol {spec.atol:g} "
                            f"({bad.sum()} of {bad.size} values, {np.isnan(a).sum()} NaN)")
    if failures:
        raise ParityError(spec.name, failures)
    return diffs


def run_torch(module: nn.Module, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fp32 torch reference on ``feeds`` (fp16 feeds are widened, so both sides see the same values)."""
    args = [torch.from_numpy(v.astype(np.float32) if v.dtype == np.float16 else v) for v in feeds.values()]
    with torch.no_grad():
        out = module(*args)
    out = out if isinstance(out, tuple) else (out,)
    return {t.name: o.float().numpy() for t, o in zip(spec.outputs, out)}


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors (Fail, InvalidGraph, ...)
        raise ExportError(f"{path.name}: ONNX Runtime cannot load the exported graph ({e}); "
                          "try another --opset or report the model") from None
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


@contextlib.contextmanager
def circular_padding(*modules: nn.Module):
    """Every padded Conv2d of ``modules`` pads by wrapping around while inside (A1111's seamless tiling, which
    sets ``padding_mode = "circular"`` the same way); the exporter emits the wrap as Slice + Concat."""
    convs = [m for module in modules for m in module.modules()
             if isinstance(m, nn.Conv2d) and any(m.padding) and m.padding_mode == "zeros"]
    for conv in convs:
        conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv in convs:
            conv.padding_mode = "zeros"
