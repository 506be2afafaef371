#!/usr/bin/env python
"""Copy a trained pipeline folder into `fastgen_diffusers/assets/` as an embedded model, in fp16 where it is safe.

Diffusers models (UNet, VAE) are stored in fp16 and load back as fp32 by default. Transformers
models keep the dtype they were saved in, so the text encoder stays fp32: an fp16 text encoder
would hand fp16 embeddings to an fp32 UNet on the CPU.

    python training/export_asset.py /root/fastgen-runs/shapes-teacher shapes-teacher
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from diffusers import ModelMixin

from fastgen_diffusers import FastPipeline, assets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="A trained pipeline folder.")
    parser.add_argument("name", help="Asset name, e.g. shapes-teacher.")
    args = parser.parse_args()
    if not (args.source / "model_index.json").is_file():
        parser.error(f"source {str(args.source)!r} has no model_index.json.")

    pipe = FastPipeline.from_pretrained(args.source)
    for component in pipe.components.values():
        if isinstance(component, ModelMixin):
            component.to(torch.float16)
    target = assets.ASSETS_DIR / args.name
    staging = target.with_name(args.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging)
    for extra in ("README.md", "fastgen.json"):
        if (args.source / extra).is_file():
            shutil.copy(args.source / extra, staging / extra)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"Wrote {target} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
