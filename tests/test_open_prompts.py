from collections import Counter

import numpy as np
import pytest

from fastgen_diffusers.shapes import ATTRIBUTE_NAMES, ATTRIBUTE_VALUES, Attributes, parse_caption, render
from fastgen_diffusers.shapes.open_prompts import (
    PROMPT_KINDS,
    REJECTED,
    open_attribute_distances,
    open_prompts,
    score_open_prompts,
    total_variation,
)


def test_open_prompts_are_fixed_partial_and_of_every_kind():
    prompts = open_prompts(40, seed=0)
    assert prompts == open_prompts(40, seed=0) and prompts != open_prompts(40, seed=1)
    assert [p.kind for p in prompts[:4]] == list(PROMPT_KINDS)
    for p in prompts:
        assert parse_caption(p.caption) == p.stated
        kept = PROMPT_KINDS[p.kind]
        if kept is not None:
            assert {n for n in ATTRIBUTE_NAMES if getattr(p.stated, n) is not None} == set(kept)
    assert open_prompts(40)[0].caption.count(" ") == 2  # "a red circle"
    with pytest.raises(ValueError, match="num_prompts"):
        open_prompts(0)


def test_total_variation():
    assert total_variation(Counter({"a": 1, "b": 1}), ("a", "b")) == pytest.approx(0.0)
    assert total_variation(Counter({"a": 2}), ("a", "b")) == pytest.approx(0.5)
    assert total_variation(Counter({REJECTED: 3}), ("a", "b")) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        total_variation(Counter(), ("a",))


def test_collapse_and_rejects_are_far_real_images_near():
    prompts = [p for p in open_prompts(400, seed=2) if p.kind == "colour and shape"]
    # A model that always draws the same size, position and background:
    collapsed = [Attributes("small", p.stated.colour, p.stated.shape, "center", "gray") for p in prompts]
    tv = open_attribute_distances(collapsed, prompts)
    assert set(tv) == {"size", "position", "background"}
    assert tv["size"] == pytest.approx(0.5) and tv["position"] == pytest.approx(8 / 9)
    # The exact draws of the data: only sampling noise (about 0.1 at 100 prompts).
    rng = np.random.default_rng(0)
    exact = [
        Attributes(**{n: getattr(p.stated, n) or ATTRIBUTE_VALUES[n][rng.integers(len(ATTRIBUTE_VALUES[n]))] for n in ATTRIBUTE_NAMES})
        for p in prompts
    ]
    assert max(open_attribute_distances(exact, prompts).values()) < 0.25
    scores = score_open_prompts([Attributes()] * len(prompts), prompts)
    assert scores["adherence"]["all"] == 0.0 and scores["open_tv"]["mean"] == pytest.approx(1.0)


def test_real_images_of_open_prompts_score_as_the_data():
    from fastgen_diffusers.shapes.judge import ShapesJudge

    prompts = open_prompts(48, seed=0)
    images = [render(p.caption, p.seed) for p in prompts]
    scores = score_open_prompts(ShapesJudge.from_pretrained().read(images, reject=True), prompts)
    assert scores["adherence"]["all"] >= 0.95
    assert set(scores["adherence"]) == {"all", *PROMPT_KINDS}
    assert scores["open_tv"]["mean"] < 0.45  # noise floor at this tiny n; a collapsed model scores near 0.9
