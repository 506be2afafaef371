"""Bad input to every pipeline's `__call__`, fuzzed with hypothesis.

Each call either works, and then returns finite images of the asked number and size, or raises a `ValueError` or
`TypeError` whose message names the argument (in backticks, as the checks write it). Anything else (an `IndexError`
or `RuntimeError` from inside torch, NaN pixels) fails the test. Every case says which of the two it must be.

The default run is small, deterministic (a fixed seed per target) and fast; `FASTGEN_FUZZ_SCALE=N` multiplies the number
of examples, and `FASTGEN_FUZZ_REPORT=path.jsonl` appends the outcome counts per target and class of input
(docs/reliability.md, "Bad input").
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_tiny_sd_components
from diffusers import AutoencoderTiny
from fuzzing import ERROR, WORKS, fuzz, write_outcomes
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fastgen_diffusers.guidance import PPAPGuidance
from fastgen_diffusers.models.oms import OMSModel
from fastgen_diffusers.models.ppap import PPAPGuideNet
from fastgen_diffusers.pipelines.core import FastDiffusionPipeline
from fastgen_diffusers.pipelines.instaflow import InstaFlowPipeline
from fastgen_diffusers.pipelines.oms import OMSPipeline
from fastgen_diffusers.pipelines.one_step import OneStepPipeline
from fastgen_diffusers.schedulers import OneStepScheduler, RectifiedFlowEulerScheduler

OUTCOMES: Counter = Counter()
PROMPT = "a small red triangle at the top left on a black background"
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
EITHER = "either"


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    yield
    write_outcomes("pipelines", OUTCOMES)


# ---- the pipelines, built once --------------------------------------------------------------------------------


def tiny_decoder() -> AutoencoderTiny:
    torch.manual_seed(0)
    return AutoencoderTiny(
        in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
        decoder_block_out_channels=(8, 8), num_decoder_blocks=(1, 1), scaling_factor=1.0,
    )  # fmt: skip


def tiny_oms_model() -> OMSModel:
    torch.manual_seed(1)
    return OMSModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=2,
    )  # fmt: skip


def tiny_ppap(task: str) -> PPAPGuidance:
    torch.manual_seed(0)
    labels = ["circle", "square", "triangle", "cross"] if task == "classification" else ["x", "y"]
    guide = PPAPGuideNet(num_outputs=len(labels), block_out_channels=(8, 16), norm_num_groups=4, head_dim=16)
    return PPAPGuidance.from_guide(guide, task, labels, num_experts=2)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Any]:
    components = make_tiny_sd_components(tmp_path_factory.mktemp("tokenizer"))
    built = {
        "FastDiffusionPipeline (DDIM)": FastDiffusionPipeline(**components),
        "FastDiffusionPipeline (AutoencoderTiny)": FastDiffusionPipeline(**{**components, "vae": tiny_decoder()}),
        "InstaFlowPipeline": InstaFlowPipeline(**{**components, "scheduler": RectifiedFlowEulerScheduler()}),
        "OneStepPipeline": OneStepPipeline(
            **{**components, "scheduler": OneStepScheduler(**SD_SCHEDULE, prediction_type="v_prediction")}
        ),
    }
    built["OMSPipeline"] = OMSPipeline(
        oms_model=tiny_oms_model(),
        base_pipeline=built["FastDiffusionPipeline (DDIM)"],
        vae_scaling_factor=components["vae"].config.scaling_factor,
    )
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    built["ppap classifier"], built["ppap regressor"] = tiny_ppap("classification"), tiny_ppap("regression")
    return built


# ---- cases and the one check every call goes through -----------------------------------------------------------


@dataclass
class Case:
    """One input: `kind` (the class of input, for the counts), the call's arguments over the valid base call, the
    argument(s) an error must name, and whether it must work, must raise, or may do either."""

    kind: str
    kwargs: dict[str, Any]
    names: tuple[str, ...]
    expect: str
    # Arguments built at call time (fresh generators, tensors of the pipeline's shape).
    build: Any = field(default=None, repr=False)


def case(kind: str, names: str | tuple[str, ...], expect: str, **kwargs) -> Case:
    return Case(kind, kwargs, (names,) if isinstance(names, str) else names, expect)


def names_argument(message: str, names: tuple[str, ...]) -> bool:
    return any(f"`{name}" in message or f"--{name}" in message for name in names)


def expected_count(kwargs: dict[str, Any]) -> int:
    prompt, embeds = kwargs.get("prompt"), kwargs.get("prompt_embeds")
    batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else embeds.shape[0]
    return batch * kwargs.get("num_images_per_prompt", 1)


def check_images(images, kwargs: dict[str, Any], size: tuple[int, int]) -> None:
    """The images a working call returns: as many as asked, of the asked size, every value finite."""
    output_type = kwargs.get("output_type", "pil")
    count = expected_count(kwargs)
    height, width = kwargs.get("height") or size[0], kwargs.get("width") or size[1]
    if output_type == "pil":
        assert len(images) == count and all(isinstance(i, Image.Image) for i in images)
        assert all(i.size == (width, height) for i in images)
        return
    array = images.float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    assert array.shape[0] == count
    if output_type == "np":
        assert array.shape[1:3] == (height, width)
    elif output_type == "pt":
        assert array.shape[2:] == (height, width)
    assert np.isfinite(array).all(), "a working call returned non-finite images"


def run_case(target: str, pipe, base: dict[str, Any], item: Case, size=(32, 32)) -> str:
    """Call `pipe` with `item` over `base`; assert the outcome class and the message; count it."""
    kwargs = {**base, **item.kwargs}
    kwargs = {k: v for k, v in kwargs.items() if v is not DROP}
    if item.build is not None:
        kwargs.update(item.build(pipe, kwargs))
    try:
        images = pipe(**kwargs).images
    except (ValueError, TypeError) as error:
        outcome = type(error).__name__
        assert item.expect != WORKS, f"{target}, {item.kind}: expected to work, raised {error!r}"
        assert names_argument(str(error), item.names), f"{target}, {item.kind}: {error!r} names none of {item.names}"
    else:
        outcome = "works"
        assert item.expect != ERROR, f"{target}, {item.kind}: expected an error naming {item.names}, but it worked"
        check_images(images, kwargs, size)
    OUTCOMES[(target, item.kind, outcome)] += 1
    return outcome


DROP = object()  # an argument the case removes from the base call


# ---- strategies: one class of input each -------------------------------------------------------------------------

NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
WRONG_TYPES = st.sampled_from(["2", b"2", [2], (2,), {"a": 1}, object(), torch.tensor(2.0), 2j])
NUMBERS = st.floats(-20, 20, allow_nan=False)


def steps_cases(works_max: int) -> st.SearchStrategy[Case]:
    name = "num_inference_steps"
    return st.one_of(
        st.integers(1, works_max).map(lambda n: case("steps: small positive int", name, WORKS, num_inference_steps=n)),
        st.integers(-(10**9), 0).map(lambda n: case("steps: 0 or negative", name, ERROR, num_inference_steps=n)),
        st.floats(allow_nan=True).map(lambda n: case("steps: float", name, ERROR, num_inference_steps=n)),
        st.one_of(WRONG_TYPES, st.just(True)).map(lambda v: case("steps: wrong type", name, ERROR, num_inference_steps=v)),
    )


def guidance_cases() -> st.SearchStrategy[Case]:
    name = "guidance_scale"
    return st.one_of(
        NUMBERS.map(lambda g: case("guidance_scale: finite (negative too)", name, WORKS, guidance_scale=g)),
        NOT_FINITE.map(lambda g: case("guidance_scale: NaN or inf", name, ERROR, guidance_scale=g)),
        st.one_of(WRONG_TYPES, st.none()).map(lambda g: case("guidance_scale: wrong type", name, ERROR, guidance_scale=g)),
    )


def size_cases(factor: int) -> st.SearchStrategy[Case]:
    def sized(kind, expect):
        return lambda hw: case(f"height/width: {kind}", ("height", "width"), expect, height=hw[0], width=hw[1])

    multiple = st.integers(1, 24).map(lambda k: k * factor)
    not_multiple = st.integers(1, 200).filter(lambda v: v % factor != 0)
    bad = st.one_of(st.integers(-(10**6), -1), st.sampled_from([32.0, 31.5, "32", True, math.nan]))
    return st.one_of(
        st.tuples(multiple, multiple).map(sized("multiples of the VAE factor", WORKS)),
        st.tuples(multiple, not_multiple).map(sized("not a multiple of the VAE factor", ERROR)),
        st.tuples(not_multiple, multiple).map(sized("not a multiple of the VAE factor", ERROR)),
        st.tuples(bad, multiple).map(sized("negative or wrong type", ERROR)),
        st.tuples(multiple, st.just(0)).map(sized("zero", ERROR)),
    )


def prompt_cases() -> st.SearchStrategy[Case]:
    name = "prompt"
    return st.one_of(
        st.text(max_size=40).map(lambda p: case("prompt: any text", name, WORKS, prompt=p)),
        st.sampled_from(["", " ", "x" * 10_000, "\x00\n\t", "🙂" * 300]).map(
            lambda p: case("prompt: empty or 10,000 characters", name, WORKS, prompt=p)
        ),
        st.lists(st.text(max_size=10), min_size=1, max_size=3).map(lambda p: case("prompt: list", name, WORKS, prompt=p)),
        st.sampled_from([[], [1], ["a", None], 5, b"bytes", ("a", "b"), {"a"}]).map(
            lambda p: case("prompt: wrong type or empty list", name, ERROR, prompt=p)
        ),
        st.just(case("prompt: none and no prompt_embeds", ("prompt", "prompt_embeds"), ERROR, prompt=None)),
    )


def embeds_cases(dim: int) -> st.SearchStrategy[Case]:
    """prompt_embeds (and negative_prompt_embeds) in every shape: the width must be the text encoder's."""
    names = ("prompt_embeds", "negative_prompt_embeds", "prompt")

    def embeds_case(kind, expect, shape, negative_shape=None, fill=None, with_prompt=False, dtype=torch.float32):
        def build(pipe, kwargs):
            built = {"prompt_embeds": make_tensor(shape, fill, dtype)}
            if negative_shape is not None:
                built["negative_prompt_embeds"] = make_tensor(negative_shape, None, dtype)
            return built

        item = case(f"prompt_embeds: {kind}", names, expect, prompt=PROMPT if with_prompt else None)
        item.build = build
        return item

    batch, tokens = st.integers(1, 3), st.integers(1, 80)
    return st.one_of(
        st.tuples(batch, tokens).map(lambda s: embeds_case("valid", WORKS, (s[0], s[1], dim))),
        st.tuples(batch, tokens).map(
            lambda s: embeds_case("with a matching negative", WORKS, (s[0], s[1], dim), (s[0], s[1], dim))
        ),
        st.tuples(batch, batch, tokens).filter(lambda s: s[0] != s[1]).map(
            lambda s: embeds_case("negative batch differs", ERROR, (s[0], s[2], dim), (s[1], s[2], dim))
        ),
        st.tuples(batch, tokens, st.integers(1, 40).filter(lambda d: d != dim)).map(
            lambda s: embeds_case("wrong width", ERROR, (s[0], s[1], s[2]))
        ),
        st.sampled_from([(4,), (1, 77), (1, 1, 77, dim), (0, 77, dim)]).map(
            lambda s: embeds_case("wrong rank or empty batch", ERROR, s)
        ),
        NOT_FINITE.map(lambda v: embeds_case("NaN or inf", ERROR, (1, 77, dim), fill=v)),
        st.just(embeds_case("integer dtype (cast, as Diffusers does)", WORKS, (1, 77, dim), dtype=torch.int64)),
        st.just(embeds_case("with prompt too", ERROR, (1, 77, dim), with_prompt=True)),
    )


def make_tensor(shape, fill=None, dtype=torch.float32) -> torch.Tensor:
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if fill is not None and tensor.numel():
        tensor.view(-1)[tensor.numel() // 2] = fill
    return tensor.to(dtype)


def latents_cases() -> st.SearchStrategy[Case]:
    name = "latents"

    def latents_case(kind, expect, change=None, fill=None, value=None):
        def build(pipe, kwargs):
            if value is not None:
                return {"latents": value}
            base = getattr(pipe, "base_pipeline", None) or pipe
            shape = [expected_count(kwargs), base.unet.config.in_channels, 16, 16]
            if change is not None:
                shape[change[0]] += change[1]
            return {"latents": make_tensor(tuple(shape), fill)}

        item = case(f"latents: {kind}", name, expect)
        item.build = build
        return item

    return st.one_of(
        st.just(latents_case("right shape", WORKS)),
        NOT_FINITE.map(lambda v: latents_case("NaN or inf", ERROR, fill=v)),
        st.tuples(st.integers(0, 3), st.sampled_from([-1, 1, 5])).map(
            lambda c: latents_case("wrong shape", ERROR, change=c)
        ),
        st.sampled_from([[[0.0]], np.zeros((1, 4, 16, 16)), "noise", 3]).map(
            lambda v: latents_case("not a tensor", ERROR, value=v)
        ),
        st.just(latents_case("wrong rank", ERROR, value=torch.zeros(4, 16, 16))),
    )


def negative_prompt_cases() -> st.SearchStrategy[Case]:
    name = "negative_prompt"
    return st.one_of(
        st.text(max_size=20).map(lambda n: case("negative_prompt: text", name, WORKS, negative_prompt=n)),
        st.integers(1, 3).map(
            lambda n: case("negative_prompt: one per prompt", name, WORKS, prompt=[PROMPT] * n, negative_prompt=["b"] * n)
        ),
        st.tuples(st.integers(1, 3), st.integers(0, 4)).filter(lambda s: s[0] != s[1]).map(
            lambda s: case("negative_prompt: list of the wrong length", name, ERROR, prompt=[PROMPT] * s[0],
                           negative_prompt=["blue"] * s[1])
        ),
        st.tuples(st.integers(1, 3), st.integers(0, 4), st.sampled_from([1.0, 3.0])).filter(lambda s: s[0] != s[1]).map(
            lambda s: case("negative_prompt: wrong length, CFG", name, ERROR, prompt=[PROMPT] * s[0],
                           negative_prompt=["blue"] * s[1], guidance_scale=s[2])
        ),
        st.sampled_from([3, ["a", 3], b"x", {"a"}]).map(
            lambda n: case("negative_prompt: wrong type", name, ERROR, negative_prompt=n)
        ),
        st.just(case("negative_prompt: with negative_prompt_embeds", name, ERROR, negative_prompt="x",
                     negative_prompt_embeds=torch.zeros(1, 77, 8))),
    )


def images_per_prompt_cases() -> st.SearchStrategy[Case]:
    name = "num_images_per_prompt"
    return st.one_of(
        st.integers(1, 3).map(lambda n: case("num_images_per_prompt: 1-3", name, WORKS, num_images_per_prompt=n)),
        st.integers(-(10**6), 0).map(lambda n: case("num_images_per_prompt: 0 or negative", name, ERROR,
                                                    num_images_per_prompt=n)),
        st.one_of(WRONG_TYPES, st.just(2.0), st.just(True), st.none()).map(
            lambda n: case("num_images_per_prompt: wrong type", name, ERROR, num_images_per_prompt=n)
        ),
    )


def output_type_cases() -> st.SearchStrategy[Case]:
    name = "output_type"
    return st.one_of(
        st.sampled_from(["pil", "np", "pt", "latent"]).map(lambda o: case("output_type: valid", name, WORKS, output_type=o)),
        st.one_of(st.text(max_size=8).filter(lambda o: o not in ("pil", "np", "pt", "latent")), st.none(), WRONG_TYPES).map(
            lambda o: case("output_type: invalid", name, ERROR, output_type=o)
        ),
    )


def generator_cases() -> st.SearchStrategy[Case]:
    name = "generator"

    def generator_case(kind, expect, count=None, value=None, prompts=1):
        def build(pipe, kwargs):
            if value is not None:
                return {"generator": value}
            return {"generator": [torch.Generator().manual_seed(i) for i in range(count)]}

        item = case(f"generator: {kind}", name, expect, prompt=[PROMPT] * prompts)
        item.build = build
        return item

    return st.one_of(
        st.integers(1, 3).map(lambda n: generator_case("one per image", WORKS, count=n, prompts=n)),
        st.tuples(st.integers(0, 4), st.integers(1, 3)).filter(lambda s: s[0] != s[1]).map(
            lambda s: generator_case("list of the wrong length", ERROR, count=s[0], prompts=s[1])
        ),
        st.sampled_from([0, "seed", [0], [None], np.random.default_rng(0)]).map(
            lambda v: generator_case("not a torch.Generator", ERROR, value=v)
        ),
    )


def negative_attention_cases() -> st.SearchStrategy[Case]:
    name = "negative_attention"
    scale = st.floats(0, 5, allow_nan=False)
    with_negative = {"negative_prompt": "a blue square"}
    return st.one_of(
        scale.map(lambda s: case("negative_attention: nasa scale", name, WORKS, negative_attention={"scale": s},
                                 **with_negative)),
        st.tuples(scale, scale, scale).map(
            lambda s: case("negative_attention: nag settings", name, WORKS, **with_negative,
                           negative_attention={"method": "nag", "scale": s[0], "tau": s[1], "alpha": s[2]})
        ),
        st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k not in ("method", "scale")), NUMBERS,
                        min_size=1, max_size=2).map(
            lambda d: case("negative_attention: unknown keys", name, ERROR, negative_attention=d, **with_negative)
        ),
        st.one_of(st.floats(max_value=-1e-9), NOT_FINITE, st.sampled_from(["1", None, True, [1]])).map(
            lambda v: case("negative_attention: bad scale", name, ERROR, negative_attention={"scale": v}, **with_negative)
        ),
        st.sampled_from(["nasa", "NASA", "cfg", "", 1]).filter(lambda m: m != "nasa").map(
            lambda m: case("negative_attention: unknown method", name, ERROR, negative_attention={"method": m})
        ),
        st.sampled_from(["nasa", 0.5, ["scale"], ("scale", 1)]).map(
            lambda v: case("negative_attention: not a dict", name, ERROR, negative_attention=v)
        ),
        st.just(case("negative_attention: with CFG", name, ERROR, negative_attention={"scale": 0.5}, guidance_scale=3.0,
                     **with_negative)),
    )


def other_call_cases(num_text_layers: int) -> st.SearchStrategy[Case]:
    def bad_guidance_fn(kind):
        if kind == "wrong shape":
            return lambda output, latents, t, scheduler: output[:, :2]
        return lambda output, latents, t, scheduler: output * math.nan

    return st.one_of(
        st.floats(0, 1).map(lambda e: case("eta: in [0, 1]", "eta", WORKS, eta=e)),
        st.one_of(NOT_FINITE, st.sampled_from(["0", None])).map(lambda e: case("eta: NaN or wrong type", "eta", ERROR, eta=e)),
        st.integers(0, num_text_layers).map(lambda c: case("clip_skip: within the text encoder", "clip_skip", WORKS,
                                                           clip_skip=c)),
        st.one_of(st.integers(num_text_layers + 1, 100), st.integers(-100, -1), st.sampled_from([1.5, "1"])).map(
            lambda c: case("clip_skip: out of range or wrong type", "clip_skip", ERROR, clip_skip=c)
        ),
        st.sampled_from(["wrong shape", "NaN"]).map(
            lambda k: case(f"guidance_fn: returns {k}", "guidance_fn", ERROR, guidance_fn=bad_guidance_fn(k))
        ),
        st.sampled_from([1, "fn"]).map(lambda g: case("guidance_fn: not callable", "guidance_fn", ERROR, guidance_fn=g)),
        st.sampled_from([1, "callback"]).map(
            lambda c: case("callback_on_step_end: not callable", "callback_on_step_end", ERROR, callback_on_step_end=c)
        ),
        st.sampled_from([["noise"], "latents", [1]]).map(
            lambda c: case("callback_on_step_end_tensor_inputs: unknown", "callback_on_step_end_tensor_inputs", ERROR,
                           callback_on_step_end_tensor_inputs=c)
        ),
        st.just(case("callback_on_step_end: returns NaN latents", "callback_on_step_end", ERROR,
                     callback_on_step_end=lambda pipe, i, t, kw: {"latents": kw["latents"] * math.nan})),
    )


def pipeline_cases(factor: int, works_max_steps: int, dim: int = 8, num_text_layers: int = 2) -> st.SearchStrategy[Case]:
    return st.one_of(
        steps_cases(works_max_steps), guidance_cases(), size_cases(factor), prompt_cases(), embeds_cases(dim),
        latents_cases(), negative_prompt_cases(), images_per_prompt_cases(), output_type_cases(), generator_cases(),
        negative_attention_cases(), other_call_cases(num_text_layers),
    )  # fmt: skip


# ---- the targets ----------------------------------------------------------------------------------------------

BASE_CALLS = {
    "FastDiffusionPipeline (DDIM)": {"num_inference_steps": 2},
    "FastDiffusionPipeline (AutoencoderTiny)": {"num_inference_steps": 1},
    "InstaFlowPipeline": {},
    "OneStepPipeline": {},
}


@pytest.mark.parametrize("target", sorted(BASE_CALLS))
def test_pipeline_call(pipes, target):
    pipe = pipes[target]
    base = {"prompt": PROMPT, "output_type": "np", **BASE_CALLS[target]}

    @fuzz(80, target)
    @given(item=pipeline_cases(pipe.vae_scale_factor, works_max_steps=3))
    def check(item):
        run_case(target, pipe, base, item)

    check()


def oms_cases() -> st.SearchStrategy[Case]:
    def oms_case(kind, names, expect, **kwargs):
        return case(f"oms: {kind}", names, expect, **kwargs)

    scale = "oms_guidance_scale"
    return st.one_of(
        st.floats(0, 10).map(lambda g: oms_case("oms_guidance_scale >= 0", scale, WORKS, oms_guidance_scale=g)),
        st.one_of(st.floats(max_value=-1e-9), NOT_FINITE).map(
            lambda g: oms_case("oms_guidance_scale negative or not finite", scale, ERROR, oms_guidance_scale=g)
        ),
        st.one_of(WRONG_TYPES, st.just(True)).map(
            lambda g: oms_case("oms_guidance_scale wrong type", scale, ERROR, oms_guidance_scale=g)
        ),
        st.one_of(st.text(max_size=20), st.just("x" * 10_000)).map(
            lambda p: oms_case("oms_prompt text", "oms_prompt", WORKS, oms_prompt=p)
        ),
        st.tuples(st.integers(1, 3), st.integers(0, 4)).map(
            lambda s: oms_case("oms_prompt list", "oms_prompt", WORKS if s[0] == s[1] else ERROR, prompt=[PROMPT] * s[0],
                               oms_prompt=["a red square"] * s[1])
        ),
        st.sampled_from([3, ["a", 3], b"x"]).map(lambda p: oms_case("oms_prompt wrong type", "oms_prompt", ERROR,
                                                                    oms_prompt=p)),
        st.tuples(st.integers(1, 3), st.integers(0, 4)).map(
            lambda s: oms_case("oms_negative_prompt list", "oms_negative_prompt", WORKS if s[0] == s[1] else ERROR,
                               prompt=[PROMPT] * s[0], oms_negative_prompt=["noise"] * s[1], oms_guidance_scale=2.0)
        ),
        st.sampled_from([(1, 77, 8), (1, 77, 16), (2, 77, 8), (77, 8)]).map(
            lambda s: oms_case("oms_prompt_embeds shape", "oms_prompt_embeds", WORKS if s == (1, 77, 8) else ERROR,
                               oms_prompt_embeds=torch.zeros(s))
        ),
        st.just(oms_case("oms_prompt_embeds NaN", "oms_prompt_embeds", ERROR,
                         oms_prompt_embeds=torch.full((1, 77, 8), math.nan))),
        st.sampled_from([True, False]).map(lambda o: oms_case("oms on/off", "oms", WORKS, oms=o)),
        st.sampled_from([1, "yes", None]).map(lambda o: oms_case("oms wrong type", "oms", ERROR, oms=o)),
    )


def test_oms_pipeline_call(pipes):
    target, pipe = "OMSPipeline", pipes["OMSPipeline"]
    base = {"prompt": PROMPT, "output_type": "np", "num_inference_steps": 2}
    shared = st.one_of(
        steps_cases(3), size_cases(pipe.base_pipeline.vae_scale_factor), prompt_cases(), embeds_cases(8),
        latents_cases(), images_per_prompt_cases(), generator_cases(), output_type_cases(), guidance_cases(),
    )  # fmt: skip

    @fuzz(80)
    @given(item=st.one_of(oms_cases(), shared))
    def check(item):
        run_case(target, pipe, base, item)

    check()


def ppap_cases() -> st.SearchStrategy[tuple[str, Case]]:
    """(which guide, the bind arguments as a case); the case's kwargs go to `bind`, not to the pipeline."""
    scale = st.one_of(
        st.floats(-5, 5, allow_nan=False).map(lambda s: ("finite scale", WORKS, s)),
        NOT_FINITE.map(lambda s: ("scale NaN or inf", ERROR, s)),
        st.sampled_from(["1", [1.0], True]).map(lambda s: ("scale wrong type", ERROR, s)),
    )

    def with_scale(guide, kind, name, **bind):
        return scale.map(lambda s: (guide, case(f"{kind}; {s[0]}", (name, "scale"), s[1], **bind, scale=s[2])))

    classifier, regressor = "ppap classifier", "ppap regressor"
    return st.one_of(
        st.sampled_from(["circle", "cross", 0, 3]).flatmap(
            lambda c: with_scale(classifier, "class_label valid", "class_label", class_label=c)
        ),
        st.sampled_from(["hexagon", "", 4, -1, True, 1.0, ["circle", "square"], None]).map(
            lambda c: (classifier, case("class_label unknown, wrong type or per-image list of the wrong length",
                                        "class_label", ERROR, class_label=c))
        ),
        st.lists(st.floats(-1, 1), min_size=2, max_size=2).flatmap(
            lambda t: with_scale(regressor, "target valid", "target", target=t)
        ),
        st.sampled_from([[0.0], [0.0, 0.0, 0.0], [math.nan, 0.0], [0.0, math.inf], "xy", None, [[0.0, 0.0]] * 3]).map(
            lambda t: (regressor, case("target wrong length, NaN, or wrong type", "target", ERROR, target=t))
        ),
        st.one_of(st.floats(max_value=0), NOT_FINITE, st.just("1")).map(
            lambda g: (classifier, case("grad_rms not positive and finite", "grad_rms", ERROR, class_label=0,
                                        grad_rms=g))
        ),
    )


@pytest.mark.parametrize("target", ["FastDiffusionPipeline (DDIM)", "InstaFlowPipeline"])
def test_ppap_guidance(pipes, target):
    """PPAP's `bind` and the call it guides: bad scales and targets are refused at `bind` (naming them), or at the
    call when they depend on the batch; good ones give finite images."""
    pipe = pipes[target]
    base = {"prompt": PROMPT, "output_type": "np", **BASE_CALLS[target]}

    @fuzz(40, target)
    @given(guide_and_case=ppap_cases())
    def check(guide_and_case):
        guide, item = guide_and_case
        try:
            guidance_fn = pipes[guide].bind(**item.kwargs)
        except (ValueError, TypeError) as error:
            assert item.expect != WORKS, f"{item.kind}: bind raised {error!r}"
            assert names_argument(str(error), item.names), f"{item.kind}: {error!r} names none of {item.names}"
            OUTCOMES[(f"PPAP bind + {target}", item.kind, type(error).__name__)] += 1
            return
        run_case(f"PPAP bind + {target}", pipe, base, Case(item.kind, {"guidance_fn": guidance_fn}, item.names,
                                                            item.expect))  # fmt: skip

    check()


# ---- what the fuzzing found, pinned ------------------------------------------------------------------------------


def test_clip_skip_reads_an_earlier_layer(pipes):
    """Diffusers' `clip_skip` path reads `text_encoder.text_model`, which transformers 5 removed: every call with
    `clip_skip` crashed. It is the hidden state `clip_skip` layers before the last, through the final layer norm."""
    pipe = pipes["FastDiffusionPipeline (DDIM)"]

    def latents(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return pipe(PROMPT, num_inference_steps=1, output_type="latent", generator=generator, **kwargs).images

    plain = latents()
    torch.testing.assert_close(latents(clip_skip=0), plain, atol=1e-5, rtol=1e-5)
    assert (latents(clip_skip=1) - plain).abs().max() > 1e-4
    tokens = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        hidden = pipe.text_encoder(tokens, output_hidden_states=True).hidden_states[-2]
        expected = pipe.text_encoder.final_layer_norm(hidden)
        embeds, _ = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, False, clip_skip=1)
    torch.testing.assert_close(embeds, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("broken", ["unet", "vae"])
def test_nan_from_a_model_raises_instead_of_a_black_image(pipes, monkeypatch, broken):
    """NaN from the model itself (a float16 overflow) is no argument's fault: it raises FloatingPointError, where
    the PNG would have been black."""
    pipe = pipes["OneStepPipeline"]
    if broken == "unet":
        monkeypatch.setattr(pipe.unet, "forward", lambda sample, *args, **kwargs: (torch.full_like(sample, math.nan),))
    else:
        monkeypatch.setattr(pipe.vae, "decode", lambda latents, **kwargs: (torch.full((1, 3, 32, 32), math.nan),))
    with pytest.raises(FloatingPointError, match="NaN"):
        pipe(PROMPT)
