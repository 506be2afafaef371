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
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastgen_diffusers import FastPipeline
from fastgen_diffusers.cli import sampling_kwargs
from fastgen_diffusers.pipelines.auto import read_fastgen_metadata, resolve_model_location
from fastgen_diffusers.shapes import evaluation_prompts, render, render_attributes
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
    no_overrides = argparse.Namespace(steps=None, guidance_scale=None, negative_scale=None, negative_method=None)
    return pipe, sampling_kwargs(no_overrides, read_fastgen_metadata(resolve_model_location(model)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="Embedded model or folder; repeatable.")
    parser.add_argument("--negative-model", action="append", default=[], help="One-step model; repeatable.")
    parser.add_argument("--open-model", action="append", default=[], help="A row of open_comparison.png; repeatable.")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()

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
