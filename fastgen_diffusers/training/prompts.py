"""Where a training run's prompts come from: a text file, a `datasets` dataset, or ShapesWorld captions.

The source is always named on the command line (exactly one of `--prompts_file`, `--dataset_name`,
`--shapesworld_prompts`): the toy world is one choice among the three, not a default a real run must work around.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

SOURCE_FLAGS = ("prompts_file", "dataset_name", "shapesworld_prompts")


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prompts (exactly one of the first three)")
    group.add_argument("--prompts_file", type=str, default=None, help="A text file, one prompt a line.")
    group.add_argument("--dataset_name", type=str, default=None, help="A `datasets` dataset (Hub id or folder).")
    group.add_argument(
        "--shapesworld_prompts",
        type=int,
        default=None,
        metavar="N",
        help="N ShapesWorld training captions, drawn with `--seed` (the validation prompts are then ShapesWorld's "
        "evaluation prompts).",
    )
    group.add_argument("--dataset_config_name", type=str, default=None)
    group.add_argument("--dataset_split", type=str, default="train")
    group.add_argument("--caption_column", type=str, default="text", help="The prompt column of `--dataset_name`.")
    group.add_argument(
        "--shapesworld_partial_caption_prob",
        type=float,
        default=0.0,
        help="Share of ShapesWorld captions that leave attributes out.",
    )


def check_prompt_args(args: argparse.Namespace) -> None:
    """Reject a missing or doubled source and values no run could use, naming the flag."""
    given = [f"--{name}" for name in SOURCE_FLAGS if getattr(args, name) is not None]
    if len(given) != 1:
        raise ValueError(
            f"Give the prompts with exactly one of `--prompts_file`, `--dataset_name` or `--shapesworld_prompts`; got"
            f" {given or 'none'}."
        )
    if args.prompts_file is not None and not Path(args.prompts_file).is_file():
        raise ValueError(f"`--prompts_file` {args.prompts_file!r} is not a file.")
    if args.shapesworld_prompts is not None and args.shapesworld_prompts <= 0:
        raise ValueError(f"`--shapesworld_prompts` must be a positive integer, got {args.shapesworld_prompts}.")
    if not 0.0 <= args.shapesworld_partial_caption_prob <= 1.0:
        raise ValueError(
            f"`--shapesworld_partial_caption_prob` must lie in [0, 1], got {args.shapesworld_partial_caption_prob}."
        )


def describe_prompt_source(args: argparse.Namespace) -> str:
    """Where the prompts came from, in words (recorded with generated pairs and compared when they resume)."""
    if args.prompts_file is not None:
        return f"prompts file {args.prompts_file}"
    if args.dataset_name is not None:
        return f"dataset {args.dataset_name} ({args.dataset_config_name}, {args.dataset_split}, {args.caption_column})"
    return (
        f"ShapesWorld train captions (seed {args.seed}, partial_caption_prob {args.shapesworld_partial_caption_prob})"
    )


def read_lines(path: str | Path, flag: str) -> list[str]:
    """The non-empty lines of a text file, stripped; a file without any is refused, naming `flag`."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"`{flag}` {str(path)!r} has no prompts.")
    return lines


def load_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of the source the flags name, in order.

    Only the caption column of a dataset is read, so datasets with images (and ShapesWorld, whose images are drawn
    on access) never decode one.
    """
    if args.prompts_file is not None:
        return read_lines(args.prompts_file, "--prompts_file")
    if args.dataset_name is not None:
        import datasets

        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split)
        if args.caption_column not in dataset.column_names:
            raise ValueError(
                f"`--caption_column` {args.caption_column!r} is not a column of `--dataset_name`"
                f" {args.dataset_name!r}; its columns are {dataset.column_names}."
            )
        prompts = [str(caption) for caption in dataset.select_columns([args.caption_column])[args.caption_column]]
        if not prompts:
            raise ValueError(f"`--dataset_name` {args.dataset_name!r} has no rows in split {args.dataset_split!r}.")
        return prompts
    from ..shapes import build_dataset

    rows = build_dataset(
        args.shapesworld_prompts,
        seed=args.seed,
        split="train",
        partial_caption_prob=args.shapesworld_partial_caption_prob,
    )
    return list(rows.with_format(None)["caption"])  # the plain column: no image is drawn


def cycle_with_empty_prompts(source: list[str], count: int, empty_prob: float, seed: int) -> list[str]:
    """`count` prompts: the source's in turn, a random `empty_prob` share of them emptied.

    The empty share stands for the unconditional part of a text-to-image model's training distribution (its caption
    dropout), which a prompts file cannot hold. The draw depends on `seed` alone, so every process agrees on it.
    """
    empty = np.random.default_rng(seed).random(count) < empty_prob
    return ["" if empty[i] else source[i % len(source)] for i in range(count)]


def default_validation_prompts(args: argparse.Namespace, prompts: list[str], count: int) -> list[str]:
    """ShapesWorld's evaluation prompts for a ShapesWorld run (prompts it never trains on), else the first training
    prompts."""
    if args.shapesworld_prompts is not None:
        from ..shapes import evaluation_prompts

        return [prompt.caption for prompt in evaluation_prompts(count, seed=args.seed)]
    return prompts[:count]


def draw_negative_prompts(prompts: list[str], negatives: list[str]) -> list[str]:
    """One negative prompt per prompt, drawn at random among the `negatives` the prompt does not name (a negative
    that contradicts the prompt teaches nothing); among all of them if it names every one."""
    drawn = []
    for prompt in prompts:
        absent = [negative for negative in negatives if f" {negative} " not in f" {prompt} "] or negatives
        drawn.append(absent[torch.randint(len(absent), ()).item()])
    return drawn
