"""The embedded fast models (2-RF, InstaFlow one-step, SNOOPI one-step) load as the right pipelines, follow the
prompt from one seed at their default sampler, and the one-step ones take negative prompts through NASA."""

import pytest
import torch

from fastgen_diffusers import FastPipeline, InstaFlowPipeline, OneStepPipeline
from fastgen_diffusers.cli import default_sampling_kwargs
from fastgen_diffusers.shapes.judge import ShapesJudge

FAST_MODELS = {
    "shapes-2rf": InstaFlowPipeline,
    "shapes-instaflow": InstaFlowPipeline,
    "shapes-snoopi": OneStepPipeline,
}
COLOURS = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "purple"]
POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom"]
BACKGROUNDS = ["black", "dark gray", "gray", "light gray"] * 2


def default_settings(name: str) -> dict:
    settings = default_sampling_kwargs(name)
    return {key: value for key, value in settings.items() if value is not None}


@pytest.fixture(scope="module")
def judge():
    return ShapesJudge.from_pretrained()


@pytest.mark.parametrize("name", sorted(FAST_MODELS))
def test_fast_model_follows_the_prompt_from_one_seed(name, judge):
    pipe = FastPipeline.from_pretrained(name)
    assert type(pipe) is FAST_MODELS[name]
    prompts = [
        f"a large {c} circle at the {p} on a {b} background" for c, p, b in zip(COLOURS, POSITIONS, BACKGROUNDS)
    ]
    images = pipe(
        prompts,
        generator=[torch.Generator().manual_seed(0) for _ in prompts],
        output_type="np",
        **default_settings(name),
    ).images
    assert images.shape == (8, 32, 32, 3)
    read = judge.read(images)
    for attribute, wanted in (("colour", COLOURS), ("position", POSITIONS), ("background", BACKGROUNDS)):
        matches = sum(getattr(r, attribute) == w for r, w in zip(read, wanted))
        assert matches >= 7, (attribute, [getattr(r, attribute) for r in read])  # chance: about 1 of 8


@pytest.mark.parametrize("name", ["shapes-instaflow", "shapes-snoopi"])
def test_one_step_negative_prompt_removes_the_colour_it_names(name, judge):
    """Colour-free prompts: the model picks a colour; naming that colour as negative prompt changes it."""
    pipe = FastPipeline.from_pretrained(name)
    prompts = [f"a large circle at the {p} on a {b} background" for p, b in zip(POSITIONS, BACKGROUNDS)]
    settings = default_settings(name)

    def generate(**kwargs):
        generator = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return judge.read(pipe(prompts, generator=generator, output_type="np", **settings, **kwargs).images)

    without = generate()
    picked = [r.colour for r in without]
    with_negative = generate(negative_prompt=picked)
    assert sum(r.colour != c for r, c in zip(with_negative, picked)) >= 6, picked
    assert generate(negative_prompt=picked, negative_attention={"scale": 0.0}) == without  # scale 0 is the plain call
