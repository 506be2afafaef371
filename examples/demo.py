#!/usr/bin/env python
"""The `make demo` job: generate with the embedded ShapesWorld teacher, then score it with the judge.

Everything runs on the CPU from checkpoints shipped inside the package; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fastgen_diffusers import assets
from fastgen_diffusers.cli import main as fastgen


PROMPTS = [
    "a large red circle at the top left on a white background",
    "a small blue square at the bottom right on a black background",
    "a large yellow triangle at the center on a dark gray background",
    "a small green cross at the top on a light gray background",
    "a red triangle",  # a held-out (colour, shape) pair, and a partial prompt
]


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--n", type=int, default=100, help="Evaluation prompts for the metrics table.")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    prompts = args.out / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    print(f"Embedded models: {', '.join(assets.names())}\n")

    start = time.perf_counter()
    fastgen(["generate", "--model", "shapes-teacher", "--prompts", str(prompts), "--num-images", "2",
             "--out", str(args.out / "shapes-teacher")])  # fmt: skip
    print(f"  ({time.perf_counter() - start:.1f} s)\n")

    print(f"ShapesWorld metrics on {args.n} evaluation prompts (`fastgen eval --model shapes-teacher --n {args.n}`):")
    fastgen(["eval", "--model", "shapes-teacher", "--n", str(args.n)])


if __name__ == "__main__":
    run()
