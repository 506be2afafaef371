"""`fastgen eval --negative`: colour removal and collateral damage, from judged attributes and end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fastgen_diffusers.cli import main
from fastgen_diffusers.pipelines.one_step import OneStepPipeline
from fastgen_diffusers.shapes import COLOURS, Attributes, evaluation_prompts, parse_caption
from fastgen_diffusers.shapes.negative_eval import (
    colour_free_prompts,
    evaluate_negative_prompts,
    format_negative_table,
    negative_prompt_metrics,
)


def attributes(colour, shape="circle", size="small", position="top", background="black") -> Attributes:
    return Attributes(size=size, colour=colour, shape=shape, position=position, background=background)


PROMPTED = [attributes(None)] * 4


def test_colour_free_prompts_keep_everything_but_the_colour():
    prompts, full = colour_free_prompts(20, seed=3), evaluation_prompts(20, seed=3)
    assert [p.seed for p in prompts] == [p.seed for p in full]
    for prompt, original in zip(prompts, full):
        assert prompt.attributes.colour is None and parse_caption(prompt.caption) == prompt.attributes
        assert prompt.attributes.shape == original.attributes.shape
        assert not any(colour in prompt.caption for colour in COLOURS)
    assert prompts[0].caption.startswith("a ") and " at the " in prompts[0].caption


def test_metrics_by_hand():
    baseline = [attributes("red"), attributes("red"), attributes("blue"), attributes("green")]
    negated = {
        # red: one of two red images turns blue (50% reduction); one image loses its position (25 points).
        "red": [attributes("blue"), attributes("red"), attributes("blue", position="left"), attributes("green")],
        # blue: removed, nothing else changes.
        "blue": [attributes("red"), attributes("red"), attributes("green"), attributes("green")],
    }
    result = negative_prompt_metrics(PROMPTED, baseline, negated)
    red, blue = result["per_colour"]["red"], result["per_colour"]["blue"]
    assert (red["share_without"], red["share_with"], red["relative_reduction"]) == (0.5, 0.25, 0.5)
    assert (blue["share_without"], blue["share_with"], blue["relative_reduction"]) == (0.25, 0.0, 1.0)
    assert result["adherence_without"] == {"shape": 1.0, "size": 1.0, "position": 1.0, "background": 1.0,
                                           "mean": 1.0, "all": 1.0}  # fmt: skip
    assert red["adherence_with"]["position"] == 0.75 and red["adherence_with"]["all"] == 0.75
    assert red["adherence_drop_points"]["position"] == pytest.approx(25.0)
    assert red["adherence_drop_points"]["mean"] == pytest.approx(6.25)  # one attribute of four, 25 points
    assert blue["adherence_drop_points"]["mean"] == 0.0

    average = result["average"]
    assert average["share_without"] == pytest.approx(0.375) and average["share_with"] == pytest.approx(0.125)
    assert average["relative_reduction"] == pytest.approx(1 - 0.25 / 0.75)  # pooled, not the mean of 0.5 and 1.0
    assert average["adherence_drop_points"]["mean"] == pytest.approx(3.125)
    assert result["meets_goals"] == {"relative_reduction": False, "adherence_drop_points": False}
    assert result["colours"] == ["red", "blue"]


def test_a_colour_never_drawn_has_no_reduction():
    baseline = [attributes("red")] * 4
    result = negative_prompt_metrics(PROMPTED, baseline, {"cyan": baseline, "red": [attributes("blue")] * 4})
    assert result["per_colour"]["cyan"]["relative_reduction"] is None
    assert result["average"]["relative_reduction"] == 1.0  # pooled: 1 - 0 / 1
    assert result["meets_goals"] == {"relative_reduction": True, "adherence_drop_points": True}
    table = format_negative_table({"n": 4, **result})
    assert "| cyan | 0.000 | 0.000 | n/a |" in table and "| red | 1.000 | 0.000 | 100.0% |" in table
    assert "(met)" in table and "not met" not in table


@pytest.mark.parametrize(
    "prompted, negated, message",
    [
        (PROMPTED, {}, "at least one colour"),
        (PROMPTED, {"pink": PROMPTED}, "colours"),
        (PROMPTED, {"red": PROMPTED[:3]}, "one entry per prompt"),
        ([attributes("red")] * 4, {"red": PROMPTED}, "leave the colour out"),
    ],
)
def test_bad_inputs_are_rejected(prompted, negated, message):
    with pytest.raises(ValueError, match=message):
        negative_prompt_metrics(prompted, PROMPTED, negated)


class StubPipeline:
    """Images that carry their prompt, negative prompt and noise seed, for `StubJudge` to read."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, generator, output_type, negative_prompt=None, negative_attention=None):
        negatives = negative_prompt or [None] * len(prompt)
        self.calls.append({"negative_prompt": negative_prompt, "negative_attention": negative_attention})
        seeds = [g.initial_seed() for g in generator]
        return SimpleNamespace(
            images=[SimpleNamespace(prompt=p, negative=n, seed=s) for p, n, s in zip(prompt, negatives, seeds)]
        )


class StubJudge:
    """Without a negative prompt every image is red; "red" as negative makes it blue and, for every other image,
    moves it to the left; other negatives change nothing."""

    def read(self, images):
        judged = []
        for i, image in enumerate(images):
            named = parse_caption(image.prompt)
            if image.negative == "red":
                judged.append(
                    Attributes(
                        **{**named.to_dict(), "colour": "blue", "position": "left" if i % 2 else named.position}
                    )
                )
            else:
                judged.append(Attributes(**{**named.to_dict(), "colour": "red"}))
        return judged


def test_evaluation_pairs_every_negative_run_with_the_baseline():
    pipe = StubPipeline()
    result = evaluate_negative_prompts(pipe, StubJudge(), num_prompts=6, seed=1, batch_size=4, negative_attention={"scale": 0.3})
    assert result["n"] == 6 and result["colours"] == list(COLOURS)
    assert len(pipe.calls) == 2 * (1 + len(COLOURS))  # two batches per run: one baseline run, one run per colour
    assert all(call["negative_attention"] == {"scale": 0.3} for call in pipe.calls)
    assert pipe.calls[0]["negative_prompt"] is None and pipe.calls[2]["negative_prompt"] == ["red"] * 4

    red = result["per_colour"]["red"]
    assert (red["share_without"], red["share_with"], red["relative_reduction"]) == (1.0, 0.0, 1.0)
    named_left = sum(p.attributes.position == "left" for p in colour_free_prompts(6, seed=1)[1::2])
    assert red["adherence_drop_points"]["position"] == pytest.approx(100 * (3 - named_left) / 6)
    assert result["per_colour"]["green"]["relative_reduction"] is None
    assert result["per_colour"]["green"]["adherence_drop_points"]["mean"] == 0.0

    with pytest.raises(ValueError, match="negative_prompt"):
        evaluate_negative_prompts(pipe, StubJudge(), num_prompts=2, negative_prompt="red")


def test_every_negative_run_uses_the_baseline_noise():
    pipe = StubPipeline()
    seeds = {}

    class RecordingJudge(StubJudge):
        def read(self, images):
            seeds.setdefault(images[0].negative, [image.seed for image in images])
            return super().read(images)

    evaluate_negative_prompts(pipe, RecordingJudge(), num_prompts=5, seed=2, batch_size=2)
    assert len(seeds) == 1 + len(COLOURS) and len({tuple(s) for s in seeds.values()}) == 1


# --- the CLI ----------------------------------------------------------------------------------------------------


@pytest.fixture
def one_step_path(tiny_sd_components, tmp_path):
    path = tmp_path / "one-step"
    OneStepPipeline(**tiny_sd_components).save_pretrained(path)
    return path


def test_eval_negative_prints_json_and_table(one_step_path, capsys):
    main(["eval", "--model", str(one_step_path), "--negative", "--n", "2", "--negative-scale", "0.5", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 2 and result["negative_attention"] == {"scale": 0.5}
    assert list(result["per_colour"]) == list(COLOURS)
    assert set(result["average"]["adherence_drop_points"]) == {
        "shape",
        "size",
        "position",
        "background",
        "mean",
        "all",
    }
    assert result["goals"] == {"relative_reduction": 0.8, "adherence_drop_points": 3.0}

    main(["eval", "--model", str(one_step_path), "--negative", "--n", "2"])
    table = capsys.readouterr().out
    assert "| negative | share without | share with | reduction |" in table and "| average |" in table


def test_negative_scale_reaches_the_pipeline(one_step_path, tmp_path):
    def generate(name: str, *flags: str) -> np.ndarray:
        out = tmp_path / name
        main(["generate", "--model", str(one_step_path), "--prompt", "a circle", "--out", str(out), *flags])
        return np.asarray(Image.open(out / "00000.png"), dtype=np.int16)

    plain = generate("plain")
    assert np.array_equal(generate("zero", "--negative-prompt", "red", "--negative-scale", "0"), plain)
    assert not np.array_equal(generate("strong", "--negative-prompt", "red", "--negative-scale", "3"), plain)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "SD", "--negative-scale", "0.1", "--n", "1"], "--negative-scale"),  # no NASA in Diffusers' SD
        (["eval", "--model", "ONE", "--negative-scale", "0.1", "--guidance-scale", "3", "--n", "1"], "--negative-scale"),
        (["eval", "--model", "ONE", "--negative-scale", "-1"], "--negative-scale"),
        (["generate", "--model", "SD", "--prompt", "x", "--negative-scale", "0.1", "--out", "o"], "--negative-scale"),
    ],
)
def test_bad_input_names_the_flag(argv, message, tiny_sd_path, one_step_path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [{"SD": str(tiny_sd_path), "ONE": str(one_step_path)}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
