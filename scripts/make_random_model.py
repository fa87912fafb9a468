"""Write a random-weight Stable Diffusion model (diffusers format) of a named architecture.

    python scripts/make_random_model.py /tmp/sd15-random --arch sd15
    python scripts/make_random_model.py /tmp/sd21-random --arch sd21        # SD 2.1, 768x768 v-prediction
    python scripts/make_random_model.py /tmp/sd21-base --arch sd21-base     # SD 2.1 base, 512x512 epsilon
    python scripts/make_random_model.py /tmp/taesd --arch taesd             # TAESD's shapes (sdrt export --tiny-vae)
    sdrt export /tmp/sd15-random /tmp/sd15-export
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sdrt.exporters.random_model import ARCHITECTURES, SDXL_ARCHITECTURES, build_random_model, build_random_tiny_vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES) + sorted(SDXL_ARCHITECTURES) + ["taesd"],
                        default="tiny", help="taesd: a tiny autoencoder (AutoencoderTiny) of TAESD's real shapes")
    parser.add_argument("--inpaint", action="store_true", help="9-channel inpainting UNet")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                        help="default: the architecture's (v_prediction for sd21, else epsilon)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.arch == "taesd":
        build_random_tiny_vae(args.out, seed=args.seed, full=True)
        return
    build_random_model(args.out, args.arch, inpaint=args.inpaint, prediction_type=args.prediction_type,
                       seed=args.seed)


if __name__ == "__main__":
    main()
