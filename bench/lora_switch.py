"""How long ``set_loras`` takes to change the LoRA set of a loaded export (merge in NumPy + reload of the
changed components), next to the time of a full ``sdrt.load``.

    python scripts/make_random_model.py /tmp/tiny --arch tiny && sdrt export /tmp/tiny /tmp/tiny-out
    python bench/lora_switch.py /tmp/tiny-out --runtime onnxruntime --rank 8 --runs 5

Two random kohya-format LoRAs are written over every attention projection (to_q/k/v/out) of the UNet and
every q/k/v/out projection of the text encoder, named from the export's weight maps, then the pipeline
alternates between {A} and {A 0.5, B -0.5}. Median of ``--runs`` switches.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import sdrt
from sdrt.manifest import read
from sdrt.weights import weight_map
from sdrt.weights.lora import PREFIXES

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def random_lora(folder: Path, path: Path, rank: int, seed: int) -> Path:
    """A kohya LoRA (fp16, alpha = rank / 2) over the attention projections the export's weight maps name."""
    rng = np.random.default_rng(seed)
    manifest, tensors = read(folder, verify=False), {}
    for component in ("unet", "text_encoder"):
        entries = weight_map.read(folder, component, manifest.components[component].file)
        for param, entry in entries.items():
            module = param.removesuffix(".weight")
            if not module.endswith(TARGETS):
                continue
            spelled = module if component == "unet" else f"text_model.{module}"    # as kohya writes it
            key = PREFIXES[component][0] + spelled.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = (rng.standard_normal((rank, entry.shape[1])) * 0.05).astype("f2")
            tensors[f"{key}.lora_up.weight"] = (rng.standard_normal((entry.shape[0], rank)) * 0.05).astype("f2")
            tensors[f"{key}.alpha"] = np.array(rank / 2, "f2")
    save_file(tensors, str(path))
    return path


def timed(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path)
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        a = random_lora(args.export, Path(tmp) / "a.safetensors", args.rank, 1)
        b = random_lora(args.export, Path(tmp) / "b.safetensors", args.rank, 2)
        load = timed(lambda: sdrt.load(args.export, runtime=args.runtime, progress=False))
        pipe = sdrt.load(args.export, runtime=args.runtime, progress=False)
        sets = [[(a, 1.0)], [(a, 0.5), (b, -0.5)]]
        first = timed(lambda: pipe.set_loras(sets[0]))
        switches, repeats = [], []
        for i in range(args.runs):
            switches.append(timed(lambda: pipe.set_loras(sets[(i + 1) % 2])))
            repeats.append(timed(lambda: pipe.set_loras(sets[(i + 1) % 2])))
        off = timed(lambda: pipe.set_loras([]))
    result = {"runtime": args.runtime, "rank": args.rank, "full_load_s": load, "first_lora_s": first,
              "switch_median_s": statistics.median(switches), "same_set_median_s": statistics.median(repeats),
              "back_to_none_s": off}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
