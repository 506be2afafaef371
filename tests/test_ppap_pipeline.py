"""`PPAPPipeline` and `FastPipeline.from_pretrained(base, ppap=...)`: the base unchanged without a target, the same
latents as binding the guidance by hand with one, in front of 2-RF, the teacher's DDIM sampler and OMS; the errors
that name their argument; the save/load round trip; one rule for the names of saved guidances."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from fastgen_diffusers import FastPipeline, InstaFlowPipeline
from fastgen_diffusers.guidance import PPAPGuidance
from fastgen_diffusers.models.ppap import PPAPGuideNet
from fastgen_diffusers.pipelines.core import FastDiffusionPipeline
from fastgen_diffusers.pipelines.oms import OMSPipeline
from fastgen_diffusers.pipelines.ppap import PPAPPipeline, resolve_ppap_location, with_guidance_loop
from fastgen_diffusers.pipelines.ppap import loading
from fastgen_diffusers.schedulers import RectifiedFlowEulerScheduler


SHAPE_LABELS = ["circle", "square", "triangle", "cross"]
PROMPTS = ["a red circle", "a small blue square"]
CALL = dict(num_inference_steps=3, guidance_scale=1.0, output_type="latent")
# A strong, normalised push, so that the guided latents differ clearly from the plain ones on untrained experts.
STRONG = dict(ppap_scale=2.0, ppap_grad_rms=0.1)


def tiny_guidance(task: str = "classification") -> PPAPGuidance:
    labels = SHAPE_LABELS if task == "classification" else ["x", "y"]
    torch.manual_seed(0)
    guide = PPAPGuideNet(num_outputs=len(labels), block_out_channels=(8, 16), norm_num_groups=4, head_dim=16)
    return PPAPGuidance.from_guide(guide, task, labels, num_experts=2)


def teacher_like(components: dict) -> StableDiffusionPipeline:
    """The teacher's layout: Diffusers' StableDiffusionPipeline with DDIM on v-prediction."""
    scheduler = DDIMScheduler.from_config(components["scheduler"].config, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(**{**components, "scheduler": scheduler}, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def two_rf_like(components: dict) -> InstaFlowPipeline:
    pipe = InstaFlowPipeline(**{**components, "scheduler": RectifiedFlowEulerScheduler()})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the call: plain without a target, the hand-bound guidance with one ----


@pytest.mark.parametrize("base_kind", ["instaflow-2rf", "teacher-ddim"])
def test_off_equals_the_base_and_on_equals_binding_by_hand(tiny_sd_components, base_kind):
    base = two_rf_like(tiny_sd_components) if base_kind == "instaflow-2rf" else teacher_like(tiny_sd_components)
    guidance = tiny_guidance()
    pipe = PPAPPipeline(guidance, base_pipeline=with_guidance_loop(base))
    sampler = pipe.base_pipeline
    assert isinstance(sampler, InstaFlowPipeline if base_kind == "instaflow-2rf" else FastDiffusionPipeline)
    assert sampler.scheduler is base.scheduler and sampler.unet is base.unet  # shared, not copied

    plain = pipe(PROMPTS, generator=seeded(), **CALL).images
    torch.testing.assert_close(plain, sampler(PROMPTS, generator=seeded(), **CALL).images, atol=1e-5, rtol=1e-5)

    guided = pipe(PROMPTS, guide_class="triangle", generator=seeded(), **CALL, **STRONG).images
    by_hand = sampler(PROMPTS, generator=seeded(), guidance_fn=guidance.bind(class_label="triangle", scale=2.0,
                                                                             grad_rms=0.1), **CALL).images  # fmt: skip
    torch.testing.assert_close(guided, by_hand, atol=1e-5, rtol=1e-5)
    assert (guided - plain).abs().mean() > 1e-2

    # The stored defaults apply when the call does not set the scale, and one class per image is accepted.
    defaults = pipe(PROMPTS, guide_class=["triangle", 0], generator=seeded(), **CALL).images
    by_hand = sampler(PROMPTS, generator=seeded(), guidance_fn=guidance.bind(class_label=["triangle", 0]), **CALL).images
    torch.testing.assert_close(defaults, by_hand, atol=1e-5, rtol=1e-5)


def test_a_regressor_guides_toward_its_target(tiny_sd_components):
    guidance = tiny_guidance("regression")
    pipe = PPAPPipeline(guidance, base_pipeline=with_guidance_loop(teacher_like(tiny_sd_components)))
    guided = pipe(PROMPTS, guide_target=[3.0, -3.0], generator=seeded(), **CALL, **STRONG).images
    by_hand = pipe.base_pipeline(PROMPTS, generator=seeded(), **CALL,
                                 guidance_fn=guidance.bind(target=[3.0, -3.0], scale=2.0, grad_rms=0.1)).images  # fmt: skip
    torch.testing.assert_close(guided, by_hand, atol=1e-5, rtol=1e-5)
    plain = pipe(PROMPTS, generator=seeded(), **CALL).images
    with torch.no_grad():
        distance = lambda latents: (guidance.predict(latents, 7.0) - torch.tensor([3.0, -3.0])).norm(dim=1)  # noqa: E731
        assert (distance(guided) < distance(plain)).all()


# ---- errors that name the argument ----


def test_call_errors_name_the_argument(tiny_sd_components):
    classifier = PPAPPipeline(tiny_guidance(), base_pipeline=two_rf_like(tiny_sd_components))
    with pytest.raises(ValueError, match=r"`guide_class` must be one of \['circle', 'square', 'triangle', 'cross'\]"):
        classifier(PROMPTS, guide_class="hexagon", **CALL)
    with pytest.raises(ValueError, match=r"`guide_class` must be one of .* got 7"):
        classifier(PROMPTS, guide_class=["circle", 7], **CALL)
    with pytest.raises(ValueError, match=r"`guide_target`: this PPAP guide is a classifier; pass `guide_class`"):
        classifier(PROMPTS, guide_target=[0.0, 0.0], **CALL)
    with pytest.raises(ValueError, match="not both"):
        classifier(PROMPTS, guide_class="circle", guide_target=[0.0, 0.0], **CALL)
    with pytest.raises(ValueError, match="`ppap_scale` is given without `guide_class` or `guide_target`"):
        classifier(PROMPTS, ppap_scale=0.5, **CALL)
    with pytest.raises(ValueError, match="`ppap_grad_rms` must be a finite number > 0"):
        classifier(PROMPTS, guide_class="circle", ppap_grad_rms=0.0, **CALL)
    with pytest.raises(TypeError, match="`ppap_scale` must be a number"):
        classifier(PROMPTS, guide_class="circle", ppap_scale="high", **CALL)
    with pytest.raises(ValueError, match="`guidance_fn`: PPAPPipeline makes it"):
        classifier(PROMPTS, guidance_fn=lambda output, *rest: output, **CALL)

    regressor = PPAPPipeline(tiny_guidance("regression"), base_pipeline=two_rf_like(tiny_sd_components))
    with pytest.raises(ValueError, match=r"`guide_class`: this PPAP guide is a regressor of \['x', 'y'\]"):
        regressor(PROMPTS, guide_class="circle", **CALL)
    with pytest.raises(ValueError, match=r"`guide_target`: `target` must be 2 values"):
        regressor(PROMPTS, guide_target=[0.0, 0.0, 1.0], **CALL)
    with pytest.raises(ValueError, match="no `base_pipeline`"):
        PPAPPipeline(tiny_guidance())(PROMPTS, guide_class="circle")


def test_bases_the_guidance_cannot_steer_are_refused(tiny_sd_components):
    guidance = tiny_guidance()
    euler = EulerDiscreteScheduler.from_config(tiny_sd_components["scheduler"].config)
    ve_base = FastDiffusionPipeline(**{**tiny_sd_components, "scheduler": euler})
    with pytest.raises(TypeError, match=r"`base_pipeline` FastDiffusionPipeline samples with EulerDiscreteScheduler.*VE"):
        PPAPPipeline(guidance, base_pipeline=ve_base)
    with pytest.raises(TypeError, match="`base_pipeline` StableDiffusionPipeline's sampling loop takes no `guidance_fn`"):
        PPAPPipeline(guidance, base_pipeline=teacher_like(tiny_sd_components))
    with pytest.raises(TypeError, match="`guidance` must be a PPAPGuidance"):
        PPAPPipeline("shapes-ppap", base_pipeline=two_rf_like(tiny_sd_components))
    torch.manual_seed(0)
    wide = PPAPGuidance.from_guide(PPAPGuideNet(block_out_channels=(8, 16), norm_num_groups=4, head_dim=16),
                                   "classification", SHAPE_LABELS, num_experts=2, latent_channels=8)  # fmt: skip
    with pytest.raises(ValueError, match="experts read 8-channel latents .* 4-channel ones"):
        PPAPPipeline(wide, base_pipeline=two_rf_like(tiny_sd_components))


# ---- saving, loading, FastPipeline, OMS in front ----


def test_save_load_round_trip_and_fast_pipeline_build_it(tiny_sd_components, tiny_sd_path, tmp_path):
    guidance = tiny_guidance()
    for name, parameter in guidance.experts.named_parameters():  # experts that differ from their fresh start
        if "expert_" in name:
            torch.manual_seed(len(name))
            parameter.data += 0.05 * torch.randn_like(parameter)
    base = two_rf_like(tiny_sd_components)
    pipe = PPAPPipeline(guidance, base_pipeline=base)
    before = pipe(PROMPTS, guide_class="square", generator=seeded(), **CALL, **STRONG).images
    pipe.save_pretrained(tmp_path / "ppap")
    assert json.loads((tmp_path / "ppap" / "ppap_config.json").read_text())["labels"] == SHAPE_LABELS
    loaded = PPAPPipeline.from_pretrained(tmp_path / "ppap", base_pipeline=base)
    after = loaded(PROMPTS, guide_class="square", generator=seeded(), **CALL, **STRONG).images
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)

    # The saved guidance in front of a checkpoint folder: a StableDiffusionPipeline folder gets the core's loop.
    built = FastPipeline.from_pretrained(tiny_sd_path, ppap=tmp_path / "ppap")
    assert isinstance(built, PPAPPipeline) and isinstance(built.base_pipeline, FastDiffusionPipeline)
    assert isinstance(built.base_pipeline.scheduler, DDIMScheduler)
    built.set_progress_bar_config(disable=True)
    assert built(PROMPTS, guide_class="square", **CALL, **STRONG).images.shape == (2, 4, 16, 16)
    # A PPAPGuidance object is taken as it is.
    assert FastPipeline.from_pretrained(tiny_sd_path, ppap=guidance).guidance is guidance
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="`ppap` .* holds no ppap_config.json"):
        FastPipeline.from_pretrained(tiny_sd_path, ppap=tmp_path / "empty")
    with pytest.raises(ValueError, match=r"PPAP collection without a member 'classifier'; its members: \['ppap'\]"):
        FastPipeline.from_pretrained(tiny_sd_path, ppap=tmp_path)


@torch.no_grad()
def test_oms_in_front_and_ppap_inside_the_base_call(tiny_sd_path, tmp_path):
    from test_oms import make_oms_model

    tiny_guidance().save_pretrained(tmp_path / "ppap")
    teacher = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    OMSPipeline(oms_model=make_oms_model(), base_pipeline=teacher,
                vae_scaling_factor=teacher.vae.config.scaling_factor).save_pretrained(tmp_path / "oms")  # fmt: skip

    pipe = FastPipeline.from_pretrained(tiny_sd_path, oms=tmp_path / "oms", ppap=tmp_path / "ppap")
    assert isinstance(pipe, PPAPPipeline) and isinstance(pipe.base_pipeline, OMSPipeline)
    assert isinstance(pipe.sampler, FastDiffusionPipeline)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(PROMPTS, generator=seeded(), **CALL).images
    torch.testing.assert_close(plain, pipe.base_pipeline(PROMPTS, generator=seeded(), **CALL).images, atol=1e-5, rtol=1e-5)
    guided = pipe(PROMPTS, guide_class="cross", generator=seeded(), **CALL, **STRONG).images
    by_hand = pipe.base_pipeline(PROMPTS, generator=seeded(), **CALL,
                                 guidance_fn=pipe.guidance.bind(class_label="cross", scale=2.0, grad_rms=0.1)).images  # fmt: skip
    torch.testing.assert_close(guided, by_hand, atol=1e-5, rtol=1e-5)
    assert (guided - plain).abs().mean() > 1e-2
    # OMS off inside the same call: PPAP on the base alone
    no_oms = pipe(PROMPTS, guide_class="cross", oms=False, generator=seeded(), **CALL, **STRONG).images
    assert not torch.allclose(no_oms, guided, atol=1e-3)


# ---- names of saved guidances: one rule for FastPipeline, PPAPPipeline and the CLI ----


def test_names_resolve_as_the_cli_reads_them(tmp_path, monkeypatch):
    shipped = loading.assets.path("shapes-ppap")
    assert resolve_ppap_location("shapes-ppap") == shipped / "classifier"
    assert resolve_ppap_location("shapes-ppap", member="regressor") == shipped / "regressor"
    assert resolve_ppap_location("shapes-ppap/regressor") == shipped / "regressor"
    assert resolve_ppap_location(shipped / "classifier-single-expert") == shipped / "classifier-single-expert"
    with pytest.raises(ValueError, match=r"without a member 'depth'; its members: \['classifier', "):
        resolve_ppap_location("shapes-ppap", member="depth")
    with pytest.raises(ValueError, match="`ppap` 'no/such/place/here' is neither a folder"):
        resolve_ppap_location("no/such/place/here")

    # A Hub id is downloaded whole (here: a stand-in for snapshot_download), then read as a local collection.
    collection = tmp_path / "collection"
    for member in ("classifier", "regressor"):
        shutil.copytree(shipped / member, collection / member)
    downloads = []
    monkeypatch.setattr(loading, "snapshot_download", lambda repo_id, **kwargs: downloads.append((repo_id, kwargs)) or str(collection))
    assert resolve_ppap_location("someone/ppap", revision="main") == collection / "classifier"
    assert resolve_ppap_location("someone/ppap/regressor") == collection / "regressor"
    assert downloads == [("someone/ppap", {"revision": "main"}), ("someone/ppap", {})]


# ---- the shipped models ----


def test_shipped_2rf_and_shapes_ppap():
    pipe = FastPipeline.from_pretrained("shapes-2rf", ppap="shapes-ppap")
    assert isinstance(pipe.base_pipeline, InstaFlowPipeline) and pipe.guidance.task == "classification"
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=2, output_type="latent")
    prompts = ["a red on a white background"] * 2
    plain = pipe(prompts, generator=seeded(), **call).images
    torch.testing.assert_close(plain, pipe.base_pipeline(prompts, generator=seeded(), **call).images, atol=1e-5, rtol=1e-5)
    guided = pipe(prompts, guide_class="triangle", generator=seeded(), **call).images
    by_hand = pipe.base_pipeline(prompts, generator=seeded(), guidance_fn=pipe.guidance.bind(class_label="triangle"),
                                 **call).images  # fmt: skip
    torch.testing.assert_close(guided, by_hand, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(guided, plain, atol=1e-3)
    with pytest.raises(ValueError, match=r"`guide_class` must be one of \['circle', 'square', 'triangle', 'cross'\]"):
        pipe(prompts, guide_class="hexagon", **call)


def test_cli_generates_with_oms_and_ppap_on_the_teacher(tmp_path):
    from fastgen_diffusers.cli import main

    out = tmp_path / "out"
    main(["generate", "--model", "shapes-teacher", "--oms", "shapes-oms", "--ppap", "shapes-ppap", "--guide-class",
          "square", "--steps", "2", "--prompt", "a red on a white background", "--out", str(out)])  # fmt: skip
    record = json.loads((out / "index.jsonl").read_text().splitlines()[0])
    assert record["guide_class"] == "square" and (out / "00000.png").is_file()
