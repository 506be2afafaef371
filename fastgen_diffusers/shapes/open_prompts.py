"""Open prompts: partial captions that leave attributes to the model, and how to score what it does with them.

A prompt that leaves an attribute open asks for the data's conditional distribution of it, which ShapesWorld
knows exactly: every open attribute is uniform over its values, independent of the stated ones (`render`).
So two questions have exact answers:

- stated-attribute adherence: the share of images with every stated attribute judged right (a rejected image,
  one that holds no single clean shape, is wrong);
- for each open attribute, the total-variation distance between the distribution of its judged values (a
  rejected image goes to an extra "rejected" bin the data never uses) and the data's uniform distribution.

The same prompts drawn by the renderer give the noise floor of that distance at this number of prompts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from .captions import ATTRIBUTE_NAMES, ATTRIBUTE_VALUES, Attributes, make_caption
from .dataset import EVAL_SEED_OFFSET
from .metrics import attribute_adherence


# Each kind keeps these attributes of a random full set (None: the dataset's random subsets, at least one kept).
PROMPT_KINDS: dict[str, tuple[str, ...] | None] = {
    "colour and shape": ("colour", "shape"),  # "a red circle"
    "no colour": ("size", "shape", "position", "background"),  # "a large circle at the top on a white background"
    "shape only": ("shape",),  # "a circle"
    "random subset": None,  # each attribute kept with probability 1/2
}
OPEN_PROMPT_SEED_OFFSET = 1  # open-prompt draws use their own random stream, apart from the full evaluation prompts
REJECTED = "rejected"


@dataclass(frozen=True)
class OpenPrompt:
    caption: str
    stated: Attributes  # what the caption names; None where it leaves the attribute open
    kind: str
    seed: int  # drawing seed for the real image of this prompt (`render(caption, seed)`)


def _random_subset(rng: np.random.Generator) -> tuple[str, ...]:
    keep = rng.random(len(ATTRIBUTE_NAMES)) < 0.5
    keep[rng.integers(len(ATTRIBUTE_NAMES))] = True
    return tuple(name for name, k in zip(ATTRIBUTE_NAMES, keep) if k)


def open_prompts(num_prompts: int = 1000, seed: int = 0) -> list[OpenPrompt]:
    """`num_prompts` partial prompts, the kinds in turn, fixed by `seed` (held-out colour-shape pairs included)."""
    if num_prompts <= 0:
        raise ValueError(f"`num_prompts` must be positive, got {num_prompts}.")
    rng = np.random.default_rng([seed, OPEN_PROMPT_SEED_OFFSET])
    kinds = list(PROMPT_KINDS)
    prompts = []
    for i in range(num_prompts):
        kind = kinds[i % len(kinds)]
        full = {name: ATTRIBUTE_VALUES[name][rng.integers(len(ATTRIBUTE_VALUES[name]))] for name in ATTRIBUTE_NAMES}
        kept = PROMPT_KINDS[kind] or _random_subset(rng)
        stated = Attributes(**{name: (full[name] if name in kept else None) for name in ATTRIBUTE_NAMES})
        drawing_seed = EVAL_SEED_OFFSET + (seed * 10_000_019 + 7_000_003 + i) % EVAL_SEED_OFFSET
        prompts.append(OpenPrompt(make_caption(stated), stated, kind, drawing_seed))
    return prompts


def total_variation(counts: Counter, values: tuple[str, ...]) -> float:
    """TV distance between the normalised `counts` (any keys, e.g. `REJECTED`) and the uniform law on `values`."""
    total = sum(counts.values())
    if total == 0:
        raise ValueError("`counts` must not be empty.")
    keys = set(values) | set(counts)
    return 0.5 * sum(abs(counts.get(k, 0) / total - (1.0 / len(values) if k in values else 0.0)) for k in keys)


def open_attribute_distances(predicted: list[Attributes | None], prompts: list[OpenPrompt]) -> dict[str, float]:
    """Per attribute: TV distance of its judged values from uniform, over the prompts that leave it open.

    `None` for a whole image, or for an attribute, means the judge rejected it: it counts in the rejected bin.
    """
    if len(predicted) != len(prompts):
        raise ValueError(f"`predicted` has {len(predicted)} entries but `prompts` has {len(prompts)}.")
    distances = {}
    for name in ATTRIBUTE_NAMES:
        judged = [
            (getattr(p, name) if p is not None else None) or REJECTED
            for p, q in zip(predicted, prompts)
            if getattr(q.stated, name) is None
        ]
        if judged:
            distances[name] = total_variation(Counter(judged), ATTRIBUTE_VALUES[name])
    return distances


def score_open_prompts(predicted: list[Attributes], prompts: list[OpenPrompt]) -> dict[str, dict[str, float]]:
    """Stated-attribute adherence per kind and overall (`adherence`), and open-attribute TV distances (`open_tv`)."""
    stated = [p.stated for p in prompts]
    by_kind = {}
    for kind in PROMPT_KINDS:
        index = [i for i, p in enumerate(prompts) if p.kind == kind]
        if index:
            by_kind[kind] = attribute_adherence([predicted[i] for i in index], [stated[i] for i in index])["all"]
    distances = open_attribute_distances(predicted, prompts)
    return {
        "adherence": {"all": attribute_adherence(predicted, stated)["all"], **by_kind},
        "open_tv": {**distances, "mean": float(np.mean(list(distances.values())))},
    }


def format_open_prompt_result(result: dict) -> str:
    """A markdown table of `evaluate_open_prompts`'s result: adherence per kind, then TV per open attribute."""
    adherence, tv = result["adherence"], result["open_tv"]
    return "\n".join(
        [
            f"n: {result['n']}   rejected: {result['rejected']:.3f}   fidelity: {result['fidelity']:.2f}",
            "| stated attributes right | " + " | ".join(adherence) + " |",
            "|---" * (len(adherence) + 1) + "|",
            "| | " + " | ".join(f"{v:.3f}" for v in adherence.values()) + " |",
            "",
            "| open attribute TV from the data | " + " | ".join(tv) + " |",
            "|---" * (len(tv) + 1) + "|",
            "| | " + " | ".join(f"{v:.3f}" for v in tv.values()) + " |",
        ]
    )
