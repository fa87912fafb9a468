"""diffusers UNet module paths in the original (SGM/LDM) spelling that kohya's SDXL LoRAs use.

kohya's sd-scripts train SDXL on Stability's original UNet, so its files name UNet modules
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` rather than diffusers'
``down_blocks.1.attentions.0...``. The layout follows the UNet: ``input_blocks.0`` is ``conv_in``, then each
down block's layers (``.0`` resnet, ``.1`` attention) and its downsampler (``.0.op``); ``middle_block`` 0/1/2
is resnet/attention/resnet; each up block has one layer more, its upsampler last (``.1`` or, after an
attention, ``.2``). diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` reads the same layout.
"""
from __future__ import annotations

import re

RESNET = {"conv1": "in_layers.2", "norm1": "in_layers.0", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
          "norm2": "out_layers.0", "conv_shortcut": "skip_connection"}
FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
         "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
BLOCK = re.compile(r"^(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)"
                   r"\.(\d+)\.?(.*)$")


def sgm_paths(modules: list[str]) -> dict[str, str]:
    """diffusers UNet module path -> its SGM path, for every module in ``modules`` that has one."""
    layers = 1 + max((int(m.split(".")[3]) for m in modules if m.startswith("down_blocks.0.resnets.")), default=-1)
    attention_up = {int(m.split(".")[1]) for m in modules if re.match(r"up_blocks\.\d+\.attentions\.", m)}
    out = {}
    for module in modules:
        path = _sgm(module, layers, attention_up)
        if path is not None:
            out[module] = path
    return out


def _sgm(module: str, layers: int, attention_up: set[int]) -> str | None:
    for prefix, sgm in FIXED.items():
        if module == prefix or module.startswith(prefix + "."):
            return sgm + module[len(prefix):]
    m = BLOCK.match(module)
    if m is None:
        return None
    kind, block, part, index, rest = m.group(1), int(m.group(2) or 0), m.group(3), int(m.group(4)), m.group(5)
    if part == "resnets":
        first, _, tail = rest.partition(".")
        rest = ".".join(p for p in (RESNET.get(first, first), tail) if p)
    if kind == "mid_block":
        return f"middle_block.{2 * index if part == 'resnets' else 1}.{rest}".rstrip(".")
    if kind == "down_blocks":
        layer = 1 + block * (layers + 1) + (layers if part == "downsamplers" else index)
        inner = {"resnets": "0", "attentions": "1", "downsamplers": "0.op"}[part]
        return f"input_blocks.{layer}.{inner}" + (f".{rest}" if rest and part != "downsamplers" else "")
    layer = block * (layers + 1) + (layers if part == "upsamplers" else index)      # up blocks: one layer more
    inner = {"resnets": "0", "attentions": "1", "upsamplers": "2" if block in attention_up else "1"}[part]
    return f"output_blocks.{layer}.{inner}.{rest}".rstrip(".")
