#!/usr/bin/env python
"""PNG grids for the README: real ShapesWorld images, and samples of an embedded model on the same prompts.

    python benchmarks/make_figures.py --model shapes-teacher --out docs/images
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastgen_diffusers import FastPipeline
from fastgen_diffusers.cli import sampling_kwargs
from fastgen_diffusers.pipelines.auto import read_fastgen_metadata, resolve_model_location
from fastgen_diffusers.shapes import evaluation_prompts, render_attributes
from fastgen_diffusers.shapes.evaluate import generate_images
from fastgen_diffusers.training.validation import save_image_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="Embedded model or folder; repeatable.")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()

    prompts = evaluation_prompts(args.n, seed=args.seed)
    save_image_grid([render_attributes(p.attributes, p.seed) for p in prompts], args.out / "shapesworld_real.png", columns=8)
    (args.out / "prompts.txt").write_text("\n".join(p.caption for p in prompts) + "\n")
    for model in args.model:
        pipe = FastPipeline.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
        defaults = sampling_kwargs(argparse.Namespace(steps=None, guidance_scale=None, nasa_scale=None), read_fastgen_metadata(resolve_model_location(model)))
        images = generate_images(pipe, [p.caption for p in prompts], seed=args.seed, **defaults)
        save_image_grid(images, args.out / f"{Path(model).name}_samples.png", columns=8)


if __name__ == "__main__":
    main()
