"""Graphs prepared for ONNX Runtime on a GPU: ``onnxruntime.transformers.optimizer``'s Stable Diffusion fusions
(as Microsoft's SD demo applies them), optionally converted to fp16.

    sdrt build OUT --backend onnxruntime --device GPU [--precision fp16]

Fused operators, by ONNX Runtime 1.32 (com.microsoft domain):
- with CPU kernels: MultiHeadAttention, SkipLayerNormalization, QuickGelu (CLIP), LayerNormalization;
- CUDA only (:data:`CUDA_ONLY`): NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, and
  MultiHeadAttention with packed QKV / packed KV inputs ("not implemented for CPU").
A graph fused with ``cpu_only=True`` leaves out the CUDA-only fusions, so its numerics can be checked
against the unfused graph on the CPU provider (tests/runtimes/test_ort_gpu.py); the full GPU fusion set runs
only on the CUDA provider and was not executed on this project's machines.
"""
from __future__ import annotations

import collections
import contextlib
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# spec name -> onnxruntime.transformers model type, as ONNX Runtime's SD pipeline optimizer maps them
# (models/stable_diffusion/optimize_pipeline.py: SDXL's UNet is "unet", both its text encoders "clip"); TAESD's
# convolutions and ReLUs have no fusion, so the tiny VAE graphs are kept as they are
MODEL_TYPES = {"text_encoder": "clip", "text_encoder_sdxl": "clip", "text_encoder_2": "clip",
               "unet": "unet", "unet_lcm": "unet", "unet_sdxl": "unet", "unet_control": "unet",
               "unet_control_sdxl": "unet", "vae_encoder": "vae", "vae_decoder": "vae"}
CUDA_ONLY = ("NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd")
SCHEME = "ort-fusion-v1"          # bump when the recipe changes: part of the build cache key
# fp16 conversion keeps these fp32, as ONNX Runtime's SD demo does (range of the timestep embedding's Sin/Cos,
# and of the normalizations' statistics)
FP32_OPS = ["RandomNormalLike", "Range", "Sin", "Cos", "InstanceNormalization", "ReduceMean", "Pow", "Sqrt"]


def fusion_options(model_type: str, cpu_only: bool = False):
    from onnxruntime.transformers.fusion_options import FusionOptions
    options = FusionOptions(model_type)
    if cpu_only and model_type in ("unet", "vae"):
        options.enable_nhwc_conv = options.enable_group_norm = options.enable_skip_group_norm = False
        options.enable_bias_splitgelu = options.enable_bias_add = False
        options.enable_packed_qkv = options.enable_packed_kv = False
    return options


def fuse(source: Path, target: Path, spec: str, cpu_only: bool = False, fp16: bool = False) -> dict[str, int]:
    """Write ``source``, the graph of spec ``spec``, fused (and, with ``fp16``, converted to fp16 with fp32 inputs
    and outputs) to ``target``; returns how many of each fused operator the graph now has."""
    from onnxruntime.transformers.onnx_model import OnnxModel
    from onnxruntime.transformers.optimizer import optimize_model
    model_type = MODEL_TYPES.get(spec)
    if model_type is None:
        import onnx
        model = OnnxModel(onnx.load(str(source)))
    else:
        with _num_heads_fix():
            model = optimize_model(str(source), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                                   optimization_options=fusion_options(model_type, cpu_only), use_gpu=not cpu_only)
    if fp16:
        half(model)
    external = Path(str(source) + "_data").is_file()
    model.save_model_to_file(str(target), use_external_data_format=external, all_tensors_to_one_file=True)
    fused = collections.Counter(n.op_type for n in model.model.graph.node if n.domain == "com.microsoft")
    log.info("onnxruntime: %s fused: %s", spec, dict(fused))
    return dict(fused)


def half(model) -> None:
    """Convert an ``OnnxModel`` to fp16 in place, keeping fp32 inputs and outputs and the :data:`FP32_OPS`."""
    model.convert_float_to_float16(keep_io_types=True, op_block_list=FP32_OPS)


@contextlib.contextmanager
def _num_heads_fix():
    """onnxruntime 1.32 with NumPy >= 2.4: ``FusionAttentionUnet.get_num_heads`` calls ``int()`` on a shape-(1,)
    array, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted"), so the UNet's attention
    fusion raises. Read the value with ``.item()`` instead while fusing."""
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts the transformers folder on sys.path)
    import fusion_attention_unet as module      # the module object the optimizer itself uses
    cls = module.FusionAttentionUnet
    original = cls.get_num_heads

    def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
        if is_torch2:
            concat = self.model.get_parent(reshape_q, 1)
            if concat is not None and concat.op_type == "Concat" and len(concat.input) == 4:
                value = self.model.get_constant_value(concat.input[2])
                if isinstance(value, np.ndarray) and value.size == 1 and int(value.item()) > 0:
                    return int(value.item())
            return 0
        return original(self, reshape_q, is_torch2)

    cls.get_num_heads = get_num_heads
    try:
        yield
    finally:
        cls.get_num_heads = original
