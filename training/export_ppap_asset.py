#!/usr/bin/env python
"""Copy trained PPAP guidance folders into one embedded asset, in fp16, with the guidance defaults chosen for them.

    python training/export_ppap_asset.py shapes-ppap \\
        classifier=runs/experts-classifier:0.15:1.0 regressor=runs/experts-regressor:0.15:1.0

Each `NAME=FOLDER:SCALE:GRAD_RMS` becomes `assets/<asset>/NAME/` (a `PPAPGuidance` folder: guide/, experts/expert_i/
adapters only, ppap_config.json with `default_scale` and `default_grad_rms`). GRAD_RMS may be `none`. The asset's
README.md joins the runs' model cards, under this command.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from fastgen_diffusers.assets import ASSETS_DIR
from fastgen_diffusers.guidance import PPAPGuidance
from fastgen_diffusers.training.hub import training_command


def parse_entry(text: str) -> tuple[str, Path, float, float | None]:
    try:
        name, rest = text.split("=", 1)
        folder, scale, grad_rms = rest.rsplit(":", 2)
        return name, Path(folder), float(scale), None if grad_rms.lower() == "none" else float(grad_rms)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER:SCALE:GRAD_RMS, got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("asset", help="The asset's name, e.g. shapes-ppap.")
    parser.add_argument("entries", nargs="+", type=parse_entry, help="NAME=FOLDER:SCALE:GRAD_RMS")
    args = parser.parse_args()

    staging = Path(tempfile.mkdtemp(prefix=f".{args.asset}.", dir=ASSETS_DIR))
    cards = []
    for name, folder, scale, grad_rms in args.entries:
        guidance = PPAPGuidance.from_pretrained(folder)
        guidance.default_scale, guidance.default_grad_rms = scale, grad_rms
        guidance.to(dtype=torch.float16).save_pretrained(staging / name)
        card = (folder / "README.md").read_text().split("---", 2)[-1].strip()
        cards.append(f"## `{name}/` (default scale {scale}, gradient RMS {grad_rms})\n\n{card.replace('# ', '### ', 1)}")
    header = (f"# {args.asset}: PPAP guides and noise-range experts for ShapesWorld\n\n"
              f"Exported by:\n\n```\n{training_command()}\n```\n\n")  # fmt: skip
    (staging / "README.md").write_text(header + "\n\n".join(cards) + "\n")
    target = ASSETS_DIR / args.asset
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    print(f"Wrote {target}")


if __name__ == "__main__":
    main()
