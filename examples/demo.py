#!/usr/bin/env python
"""The `make demo` job: the embedded ShapesWorld teacher beside its one-step students, then scored by the judge.

Every model gets the same prompts and the same seeds (so the same initial noise) at its default sampler: the
teacher 25 DDIM steps with CFG 4, the InstaFlow and SNOOPI students one UNet call. `side_by_side.png` stacks
them, one row per model. Everything runs on the CPU from checkpoints shipped inside the package; nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image

from fastgen_diffusers import assets
from fastgen_diffusers.cli import main as fastgen
from fastgen_diffusers.training.validation import save_image_grid

PROMPTS = [
    "a large red circle at the top left on a white background",
    "a small blue square at the bottom right on a black background",
    "a large yellow triangle at the center on a dark gray background",
    "a small green cross at the top on a light gray background",
    "a red triangle",  # a held-out (colour, shape) pair, and a partial prompt
]
MODELS = ["shapes-teacher", "shapes-instaflow", "shapes-snoopi"]


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--n", type=int, default=100, help="Evaluation prompts for the metrics tables.")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    prompts = args.out / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    print(f"Embedded models: {', '.join(assets.names())}\n")

    rows = []
    for model in MODELS:
        start = time.perf_counter()
        fastgen(["generate", "--model", model, "--prompts", str(prompts), "--out", str(args.out / model)])
        print(f"  {model}: {time.perf_counter() - start:.1f} s (loading included)\n")
        rows += [Image.open(args.out / model / f"{i:05d}.png") for i in range(len(PROMPTS))]
    grid = save_image_grid(rows, args.out / "side_by_side.png", columns=len(PROMPTS))
    print(f"Rows of {grid}: {', '.join(MODELS)}; columns: the prompts in {prompts}\n")

    for model in MODELS:
        print(f"ShapesWorld metrics on {args.n} evaluation prompts (`fastgen eval --model {model} --n {args.n}`):")
        fastgen(["eval", "--model", model, "--n", str(args.n)])
        print()


if __name__ == "__main__":
    run()
