"""ShapesWorld as a `datasets.Dataset`, and the fixed evaluation prompts.

Rows hold the attributes, the caption and the drawing seed; the `image` column is drawn on
access (`with_transform`), so a dataset of any size costs nothing to build or store.
Train and evaluation images use disjoint seed ranges, and the training split never shows a
held-out (colour, shape) pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np

from .captions import ATTRIBUTE_NAMES, ATTRIBUTE_VALUES, Attributes, make_caption
from .render import render_attributes


EVAL_SEED_OFFSET = 1_000_000_000  # train seeds are below, evaluation seeds at or above
SPLITS = ("train", "eval")


def _random_attributes(rng: np.random.Generator, allow_held_out: bool) -> Attributes:
    while True:
        attributes = Attributes(**{n: ATTRIBUTE_VALUES[n][rng.integers(len(ATTRIBUTE_VALUES[n]))] for n in ATTRIBUTE_NAMES})
        if allow_held_out or not attributes.is_held_out():
            return attributes


def _partial(attributes: Attributes, rng: np.random.Generator) -> Attributes:
    """Drop each attribute with probability 1/2, keeping at least one."""
    keep = rng.random(len(ATTRIBUTE_NAMES)) < 0.5
    keep[rng.integers(len(ATTRIBUTE_NAMES))] = True
    return Attributes(**{n: (getattr(attributes, n) if k else None) for n, k in zip(ATTRIBUTE_NAMES, keep)})


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {list(SPLITS)}, got {split!r}.")


def build_dataset(
    num_samples: int,
    seed: int = 0,
    split: str = "train",
    partial_caption_prob: float = 0.0,
    empty_caption_prob: float = 0.0,
    include_held_out: bool | None = None,
) -> datasets.Dataset:
    """ShapesWorld rows with columns image (drawn on access), caption, seed and one column per attribute.

    `partial_caption_prob` and `empty_caption_prob` set how often the caption leaves attributes out
    (the image always shows all five), which is how a text-to-image model learns partial prompts and
    the unconditional branch for classifier-free guidance. Held-out (colour, shape) pairs appear
    in the eval split only, unless `include_held_out` says otherwise (the judge sees them all).
    """
    _check_split(split)
    if num_samples <= 0:
        raise ValueError(f"`num_samples` must be positive, got {num_samples}.")
    if not 0.0 <= partial_caption_prob + empty_caption_prob <= 1.0:
        raise ValueError("`partial_caption_prob` + `empty_caption_prob` must lie in [0, 1].")
    if include_held_out is None:
        include_held_out = split == "eval"
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    offset = EVAL_SEED_OFFSET if split == "eval" else 0
    rows: dict[str, list] = {"caption": [], "seed": [], **{n: [] for n in ATTRIBUTE_NAMES}}
    for i in range(num_samples):
        attributes = _random_attributes(rng, allow_held_out=include_held_out)
        u = rng.random()
        if u < empty_caption_prob:
            caption = ""
        elif u < empty_caption_prob + partial_caption_prob:
            caption = make_caption(_partial(attributes, rng))
        else:
            caption = make_caption(attributes)
        rows["caption"].append(caption)
        rows["seed"].append(offset + (seed * 10_000_019 + i) % EVAL_SEED_OFFSET)
        for name in ATTRIBUTE_NAMES:
            rows[name].append(getattr(attributes, name))
    return datasets.Dataset.from_dict(rows).with_transform(_draw_images)


def _draw_images(batch: dict[str, list]) -> dict[str, list]:
    batch["image"] = [
        render_attributes(Attributes(**{n: batch[n][i] for n in ATTRIBUTE_NAMES}), batch["seed"][i])
        for i in range(len(batch["seed"]))
    ]
    return batch


@dataclass(frozen=True)
class EvalPrompt:
    caption: str
    attributes: Attributes
    seed: int


def evaluation_prompts(num_prompts: int = 1000, seed: int = 0) -> list[EvalPrompt]:
    """The fixed evaluation set: full captions over every attribute combination, held-out pairs included."""
    rows = build_dataset(num_samples=num_prompts, seed=seed, split="eval")
    table = rows.with_format(None)[:]  # plain columns, no drawing
    return [
        EvalPrompt(table["caption"][i], Attributes(**{n: table[n][i] for n in ATTRIBUTE_NAMES}), table["seed"][i])
        for i in range(num_prompts)
    ]
