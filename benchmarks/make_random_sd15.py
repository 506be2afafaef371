#!/usr/bin/env python
"""Save a randomly initialised pipeline folder with Stable Diffusion 1.5's architecture.

SD weights cannot be downloaded where this package is built, but speed and memory depend on the architecture
only. This folder stands in for `stable-diffusion-v1-5` wherever a teacher path is taken (`train_snoopi.py`,
`train_rectified_flow.py`): an 860M-parameter UNet, the SD VAE and a 12-layer, 768-wide CLIP text encoder, with
the ShapesWorld tokenizer padded to 77 tokens. `benchmarks/sd15_gpu.sh` uses it.

    python benchmarks/make_random_sd15.py /tmp/sd15-random
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench_nasa_cost import build_pipeline

SD15_ARCHITECTURE = {
    "unet_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "text_layers": 12,
    "text_length": 77,
    "vae_channels": [128, 256, 512, 512],
    "resolution": 512,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path, help="Where to write the pipeline folder.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        architecture = argparse.Namespace(**SD15_ARCHITECTURE, device="cpu", dtype="float32")
        pipe = build_pipeline(architecture, Path(tokenizer_dir))
        pipe.save_pretrained(args.output_dir)
    print(f"{args.output_dir}: UNet with {pipe.unet.num_parameters() / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
