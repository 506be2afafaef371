#!/usr/bin/env python
"""PNG grids for the README: real ShapesWorld images, samples of embedded models on the same prompts and noise,
and negative prompts on one-step models.

    python benchmarks/make_figures.py --model shapes-teacher --model shapes-2rf --model shapes-instaflow \\
        --model shapes-snoopi --negative-model shapes-snoopi --negative-model shapes-instaflow --out docs/images

Each `--model` gets `<name>_samples.png` (its default sampler, from fastgen.json), and with two or more,
`comparison.png` stacks their first 8 images as rows: image i of every model starts from the same generator, so
the same initial noise for models whose latents match (every ShapesWorld model). Each `--negative-model` gets
`<name>_negative.png`: colour-free prompts without a negative prompt (top row), and again with the colour the
judge reads in the top image as `negative_prompt` (bottom row), same noise. With `--open-model`,
`open_comparison.png` shows the first 8 open prompts (`fastgen_diffusers.shapes.open_prompts`, two of each kind,
listed in `open_prompts.txt`): real images of them in the top row, then one row per model, same noise per column.
With `--defects`, `open_defects.png` shows 8 synthetic defects of each kind (`fastgen_diffusers.shapes.defects`),
one row per kind, with a green frame on those the judge accepts (which it should not).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from fastgen_diffusers import FastPipeline
from fastgen_diffusers.cli import default_sampling_kwargs
from fastgen_diffusers.shapes import evaluation_prompts, render, render_attributes
from fastgen_diffusers.shapes.defects import defect_images
from fastgen_diffusers.shapes.evaluate import generate_images
from fastgen_diffusers.shapes.judge import ShapesJudge
from fastgen_diffusers.shapes.negative_eval import colour_free_prompts
from fastgen_diffusers.shapes.open_prompts import open_prompts
from fastgen_diffusers.training.validation import save_image_grid

COMPARISON_COLUMNS = 8


def load_with_defaults(model: str):
    """The pipeline and its default sampling settings (the model's fastgen.json)."""
    pipe = FastPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe, default_sampling_kwargs(model)


def save_defects_figure(path: Path, seed: int) -> None:
    """Synthetic defects, one row per kind; a green frame marks each one the judge accepts."""
    judge = ShapesJudge.from_pretrained()
    tiles = []
    for images in defect_images(COMPARISON_COLUMNS, seed=seed).values():
        for image, rejected in zip(images, judge.inspect(images)[2]):
            tile = np.array(image)
            if not rejected:
                tile[0, :], tile[-1, :], tile[:, 0], tile[:, -1] = (0, 255, 0), (0, 255, 0), (0, 255, 0), (0, 255, 0)
            tiles.append(Image.fromarray(tile))
    save_image_grid(tiles, path, columns=COMPARISON_COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="Embedded model or folder; repeatable.")
    parser.add_argument("--negative-model", action="append", default=[], help="One-step model; repeatable.")
    parser.add_argument("--open-model", action="append", default=[], help="A row of open_comparison.png; repeatable.")
    parser.add_argument("--defects", action="store_true", help="Also draw open_defects.png.")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()

    if args.defects:
        save_defects_figure(args.out / "open_defects.png", args.seed)
    prompts = evaluation_prompts(args.n, seed=args.seed)
    save_image_grid(
        [render_attributes(p.attributes, p.seed) for p in prompts], args.out / "shapesworld_real.png", columns=8
    )
    (args.out / "prompts.txt").write_text("\n".join(p.caption for p in prompts) + "\n")
    rows = []
    for model in args.model:
        pipe, defaults = load_with_defaults(model)
        images = generate_images(pipe, [p.caption for p in prompts], seed=args.seed, **defaults)
        save_image_grid(images, args.out / f"{Path(model).name}_samples.png", columns=8)
        rows += images[:COMPARISON_COLUMNS]
    if len(args.model) > 1:
        save_image_grid(rows, args.out / "comparison.png", columns=COMPARISON_COLUMNS)

    if args.open_model:
        partial = open_prompts(COMPARISON_COLUMNS, seed=args.seed)
        (args.out / "open_prompts.txt").write_text("\n".join(p.caption for p in partial) + "\n")
        rows = [render(p.caption, p.seed) for p in partial]
        for model in args.open_model:
            pipe, defaults = load_with_defaults(model)
            rows += generate_images(pipe, [p.caption for p in partial], seed=args.seed, **defaults)
        save_image_grid(rows, args.out / "open_comparison.png", columns=COMPARISON_COLUMNS)

    if args.negative_model:
        judge = ShapesJudge.from_pretrained()
        captions = [p.caption for p in colour_free_prompts(COMPARISON_COLUMNS, seed=args.seed)]
        (args.out / "negative_prompts.txt").write_text("\n".join(captions) + "\n")
    for model in args.negative_model:
        pipe, defaults = load_with_defaults(model)
        without = generate_images(pipe, captions, seed=args.seed, **defaults)
        negatives = [attributes.colour or "" for attributes in judge.read(without)]
        with_negative = generate_images(pipe, captions, seed=args.seed, negative_prompt=negatives, **defaults)
        save_image_grid(without + with_negative, args.out / f"{Path(model).name}_negative.png", columns=8)
        print(f"{model}: negative prompts {negatives}")


if __name__ == "__main__":
    main()
