"""PPAP (Practical Plug-And-Play guidance): an off-the-shelf guide steering any sampler through noise-range experts.

`PPAPGuidance` holds a guide trained on clean images and N experts. Each expert is a peft LoRA adapter on one
frozen backbone, the guide with a new stem that reads the 4-channel latent (latent-input experts): at sampling
the gradient is taken on the latent z_t directly, with no pass through the VAE decoder or the UNet. Expert i
owns one range of noise levels, the ranges partitioning the schedule's log-SNR axis (not its timesteps: SD's
schedule and ADM's put different noise at the same t, and a rectified-flow time maps onto the same axis).

`guidance.bind(class_label="triangle", scale=...)` returns the callable a sampling loop takes as `guidance_fn`
(`model_output = guidance_fn(model_output, latents, t, scheduler)`, after CFG and before `scheduler.step`).
It reads the parameterisation from the scheduler (epsilon / v / sample on a DDPM-family schedule, or a
rectified-flow velocity) and applies classifier guidance in that form (`conversions.py`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from ..models.ppap import EXPERT_FULLY_TRAINED, EXPERT_LORA_TARGETS, PPAPGuideNet
from ..utils.safe_loading import check_weight_files
from .conversions import (
    expert_index,
    guide_epsilon,
    guide_rectified_flow_velocity,
    guide_sample_prediction,
    guide_v_prediction,
    log_snr_edges,
    rectified_flow_log_snr,
    rectified_flow_to_vp_scale,
    rescale_gradient,
    vp_coefficients,
    vp_log_snr,
)

TASKS = ("classification", "regression")
CONFIG_NAME = "ppap_config.json"
# Stable Diffusion's scaled-linear schedule (betas 0.00085..0.012, 1000 steps) spans log-SNR -5.37 (t = 999)
# to 7.07 (t = 0): the default range the experts split.
SD_LOG_SNR_RANGE = (-5.366, 7.069)


def expert_name(index: int) -> str:
    return f"expert_{index}"


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of squared errors: the default regression loss."""
    return (prediction - target).pow(2).flatten(1).sum(dim=1)


@dataclass(frozen=True)
class NoisePoint:
    """Where a sampler's current sample sits on the VP log-SNR axis, and how to read it as a VP latent.

    `kind` is the scheduler's parameterisation: "epsilon", "v_prediction", "sample" or "flow" (rectified flow).
    The VP latent the experts read is `sample / vp_scale`.
    """

    kind: str
    log_snr: float
    vp_scale: float = 1.0
    velocity_direction: str = "noise_to_data"


def noise_point(scheduler, timestep: float | torch.Tensor) -> NoisePoint:
    """The `NoisePoint` of `timestep` under `scheduler`: a DDPM-family schedule or `RectifiedFlowEulerScheduler`."""
    timestep = float(torch.as_tensor(timestep).float().reshape(-1)[0])
    config = getattr(scheduler, "config", {})
    if "velocity_direction" in config:
        flow_sigma = torch.tensor(timestep / config.num_train_timesteps, dtype=torch.float64)
        return NoisePoint(
            kind="flow",
            log_snr=float(rectified_flow_log_snr(flow_sigma)),
            vp_scale=float(rectified_flow_to_vp_scale(flow_sigma)),
            velocity_direction=config.velocity_direction,
        )
    if getattr(scheduler, "alphas_cumprod", None) is not None:
        if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
            raise TypeError(
                f"`scheduler` {type(scheduler).__name__} keeps its sample in sigma (VE) form; PPAP guidance supports "
                "DDPM-family schedulers whose sample is the VP latent (DDIM, DDPM, PNDM, DPM-Solver) and "
                "RectifiedFlowEulerScheduler."
            )
        if config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise TypeError(f"Unsupported `prediction_type` {config.prediction_type!r} for PPAP guidance.")
        alpha_bar = scheduler.alphas_cumprod[int(round(timestep))].double()
        return NoisePoint(kind=config.prediction_type, log_snr=float(vp_log_snr(alpha_bar)))
    raise TypeError(
        f"`scheduler` {type(scheduler).__name__} has neither `alphas_cumprod` (DDPM family) nor a "
        "`velocity_direction` (RectifiedFlowEulerScheduler); PPAP guidance cannot place its timesteps."
    )


def apply_guidance(model_output: torch.Tensor, grad: torch.Tensor, point: NoisePoint, scale: float) -> torch.Tensor:
    """Classifier guidance with gradient `grad` (taken at the scheduler's own sample) in `point.kind`'s form."""
    log_snr = torch.tensor(point.log_snr, dtype=torch.float32)
    alpha, sigma = vp_coefficients(log_snr)
    grad = grad.to(model_output.dtype)
    if point.kind == "epsilon":
        return guide_epsilon(model_output, grad, sigma, scale)
    if point.kind == "v_prediction":
        return guide_v_prediction(model_output, grad, alpha, sigma, scale)
    if point.kind == "sample":
        return guide_sample_prediction(model_output, grad, alpha, sigma, scale)
    flow_sigma = torch.sigmoid(-log_snr / 2)  # the r with 2 log((1 - r) / r) = log_snr
    return guide_rectified_flow_velocity(model_output, grad, flow_sigma, scale, point.velocity_direction)


class PPAPGuidance:
    """A guide and its noise-range experts (peft LoRA adapters on one frozen latent-input backbone).

    Args:
        guide: the off-the-shelf network, trained on clean pixels in [-1, 1].
        experts: a `PeftModel` over `PPAPGuideNet.latent_input_from(guide)` with adapters `expert_0` (cleanest
            range) to `expert_{N-1}` (noisiest).
        task: "classification" (outputs are logits over `labels`) or "regression" (outputs named by `labels`).
        labels: class names, or the names of the regressed values.
        edges: N + 1 descending log-SNR boundaries; expert i owns [edges[i + 1], edges[i]]. Beyond the ends the
            end experts take over; guidance strengths are computed no noisier than `edges[-1]`.
        default_scale, default_grad_rms: what `bind` uses when not told (stored with the experts, tuned for them).
    """

    def __init__(
        self,
        guide: PPAPGuideNet,
        experts: PeftModel,
        task: str,
        labels: Sequence[str],
        edges: Sequence[float],
        default_scale: float = 1.0,
        default_grad_rms: float | None = None,
    ):
        if task not in TASKS:
            raise ValueError(f"`task` must be one of {list(TASKS)}, got {task!r}.")
        missing = [expert_name(i) for i in range(len(edges) - 1) if expert_name(i) not in experts.peft_config]
        if missing:
            raise ValueError(f"`experts` lacks adapters {missing} for {len(edges) - 1} log-SNR ranges.")
        self.guide = guide.eval().requires_grad_(False)
        self.experts = experts.eval()
        self.task = task
        self.labels = list(labels)
        self.edges = [float(e) for e in edges]
        self.default_scale, self.default_grad_rms = float(default_scale), default_grad_rms

    @property
    def num_experts(self) -> int:
        return len(self.edges) - 1

    @classmethod
    def from_guide(
        cls,
        guide: PPAPGuideNet,
        task: str,
        labels: Sequence[str],
        num_experts: int = 5,
        log_snr_range: tuple[float, float] = SD_LOG_SNR_RANGE,
        lora_rank: int = 16,
        lora_alpha: int = 16,
        latent_channels: int = 4,
    ) -> "PPAPGuidance":
        """Fresh experts for `guide`: equal log-SNR ranges over `log_snr_range`, LoRA adapters at their start."""
        backbone = PPAPGuideNet.latent_input_from(guide, latent_channels).requires_grad_(False)
        config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha,
            target_modules=EXPERT_LORA_TARGETS,
            modules_to_save=EXPERT_FULLY_TRAINED,
        )
        experts = get_peft_model(backbone, config, adapter_name=expert_name(0))
        for i in range(1, num_experts):
            experts.add_adapter(expert_name(i), config)
        return cls(guide, experts, task, labels, log_snr_edges(*log_snr_range, num_experts))

    def expert_for(self, log_snr: float) -> int:
        return expert_index(log_snr, self.edges)

    def predict(self, latents: torch.Tensor, log_snr: float) -> torch.Tensor:
        """The outputs of the expert owning `log_snr` on VP latents (differentiable in `latents`)."""
        self.experts.set_adapter(expert_name(self.expert_for(log_snr)))
        return self.experts(latents)

    def bind(
        self,
        class_label: str | int | Sequence[str | int] | None = None,
        target=None,
        scale: float | None = None,
        grad_rms: float | None = None,
        loss_fn: Callable | None = None,
    ) -> "GuidanceFunction":
        """A `guidance_fn` steering towards `class_label` (classification) or `target` (regression).

        `scale` and `grad_rms` default to the stored `default_scale` and `default_grad_rms`; `loss_fn(prediction,
        target)` (per sample) replaces the regressor's squared error.
        """
        return GuidanceFunction(
            self.predict,
            objective_for(self, class_label, target, loss_fn),
            scale=self.default_scale if scale is None else scale,
            grad_rms=self.default_grad_rms if grad_rms is None else grad_rms,
            min_log_snr=self.edges[-1],
        )

    def to(self, *args, **kwargs) -> "PPAPGuidance":
        self.guide.to(*args, **kwargs)
        self.experts.to(*args, **kwargs)
        return self

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the guide, and what each expert adds to it (its LoRA plus its own stem and norms)."""
        per_expert = sum(
            p.numel() for name, p in self.experts.named_parameters() if f".{expert_name(0)}." in f".{name}."
        )
        return {"guide": sum(p.numel() for p in self.guide.parameters()), "per_expert": per_expert}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """guide/ (Diffusers layout), experts/expert_i/ (peft adapters only) and ppap_config.json.

        Each is written in a staging folder and moved in whole; other files in `save_directory` are left alone.
        """
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".ppap-staging-", dir=save_directory))
        self.guide.save_pretrained(str(staging / "guide"))
        self.experts.save_pretrained(str(staging / "experts"))
        config = {"task": self.task, "labels": self.labels, "log_snr_edges": self.edges,
                  "latent_channels": self.experts.get_base_model().config.in_channels,
                  "default_scale": self.default_scale, "default_grad_rms": self.default_grad_rms}  # fmt: skip
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        for name in ("guide", "experts", CONFIG_NAME):
            if (save_directory / name).is_dir():
                shutil.rmtree(save_directory / name)
            os.replace(staging / name, save_directory / name)
        staging.rmdir()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        subfolder: str | None = None,
        dtype: torch.dtype = torch.float32,
        allow_pickle: bool = False,
    ) -> "PPAPGuidance":
        """Load a saved `PPAPGuidance`: a folder or an embedded asset name, with `subfolder` for a collection of them
        (`PPAPGuidance.from_pretrained("shapes-ppap", subfolder="classifier")`).

        Safetensors only: a guide or expert saved as a pickle (`.bin`) runs any code it holds when loaded, so it is
        refused (a `ValueError` naming the file) unless `allow_pickle=True`, for files you trust.
        """
        from .. import assets

        path = assets.path(str(path)) if str(path) in assets.names() else Path(path)
        path = path / subfolder if subfolder else path
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"`path` {str(path)!r} holds no {CONFIG_NAME}: not a saved PPAPGuidance.")
        check_weight_files(path, allow_pickle=allow_pickle)  # a damaged guide or expert is named
        config = json.loads((path / CONFIG_NAME).read_text())
        guide = PPAPGuideNet.from_pretrained(
            str(path / "guide"), torch_dtype=torch.float32, use_safetensors=None if allow_pickle else True
        )
        backbone = PPAPGuideNet.latent_input_from(guide, config["latent_channels"]).requires_grad_(False)
        names = [expert_name(i) for i in range(len(config["log_snr_edges"]) - 1)]
        experts = PeftModel.from_pretrained(backbone, str(path / "experts" / names[0]), adapter_name=names[0])
        for name in names[1:]:
            experts.load_adapter(str(path / "experts" / name), adapter_name=name)
        guidance = cls(guide, experts, config["task"], config["labels"], config["log_snr_edges"],
                       config.get("default_scale", 1.0), config.get("default_grad_rms"))  # fmt: skip
        return guidance if dtype == torch.float32 else guidance.to(dtype=dtype)


class DecodedGuide:
    """The clean guide used naively on a latent sampler: it reads the VAE's decoding of the current noisy latent.

    This is the paper's baseline (an off-the-shelf model applied to noisy inputs) carried into latent diffusion,
    where a pixel model can see a latent only through the decoder; the gradient flows back through it. Not a
    recommended method: decoding a noisy latent leaves the VAE's manifold, which is what the experts avoid.
    """

    def __init__(self, guide: PPAPGuideNet, vae, task: str, labels: Sequence[str]):
        self.guide = guide.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.task, self.labels = task, list(labels)

    def predict(self, latents: torch.Tensor, log_snr: float) -> torch.Tensor:
        pixels = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return self.guide(pixels.to(self.guide.dtype))

    def bind(self, class_label=None, target=None, **kwargs) -> "GuidanceFunction":
        return GuidanceFunction(self.predict, objective_for(self, class_label, target, kwargs.pop("loss_fn", None)),
                                min_log_snr=SD_LOG_SNR_RANGE[0], **kwargs)  # fmt: skip


def objective_for(guidance, class_label, target, loss_fn: Callable | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """log p(y | x) per sample as a function of the guide's outputs: log-softmax at the class, or minus the loss."""
    if guidance.task == "classification":
        if class_label is None or target is not None:
            raise ValueError(f"A classification guide takes `class_label` (one of {guidance.labels}), not `target`.")
        if not isinstance(class_label, (str, int, list, tuple)):
            raise TypeError(f"`class_label` must be a label, an index or a list of them, got {class_label!r:.100}.")
        wanted = [class_label] if isinstance(class_label, (str, int)) else list(class_label)
        for label in wanted:
            is_index = isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(guidance.labels)
            if not is_index and not (isinstance(label, str) and label in guidance.labels):
                raise ValueError(f"`class_label` must be one of {guidance.labels} or an index, got {label!r:.100}.")
        if not wanted:
            raise ValueError("`class_label` is an empty list; give one label, or one per image.")
        indices = torch.tensor([label if isinstance(label, int) else guidance.labels.index(label) for label in wanted])

        def log_probability(outputs: torch.Tensor) -> torch.Tensor:
            check_per_image("class_label", len(indices), outputs.shape[0])
            chosen = indices.to(outputs.device).expand(outputs.shape[0]) if len(indices) == 1 else indices.to(outputs.device)
            return F.log_softmax(outputs.float(), dim=1).gather(1, chosen[:, None]).squeeze(1)

        return log_probability
    if target is None or class_label is not None:
        raise ValueError(f"A regression guide takes `target` (values for {guidance.labels}), not `class_label`.")
    try:
        target = torch.as_tensor(target, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"`target` must be numbers for {guidance.labels}, got {target!r:.100} ({error}).") from None
    if target.ndim not in (1, 2) or target.shape[-1] != len(guidance.labels):
        raise ValueError(
            f"`target` must be {len(guidance.labels)} values ({guidance.labels}), or one row of them per image, got"
            f" shape {tuple(target.shape)}."
        )
    if not torch.isfinite(target).all():
        raise ValueError(f"`target` must be finite, got {target.tolist()}.")
    loss_fn = loss_fn or squared_error

    def log_probability(outputs: torch.Tensor) -> torch.Tensor:
        check_per_image("target", 1 if target.ndim == 1 else target.shape[0], outputs.shape[0])
        return -loss_fn(outputs.float(), target.to(outputs.device).expand_as(outputs))

    return log_probability


def check_per_image(name: str, count: int, batch: int) -> None:
    """A target given per image must have one entry per image of the batch being guided."""
    if count not in (1, batch):
        raise ValueError(f"`{name}` has {count} entries for a batch of {batch} images; give one, or one per image.")


class GuidanceFunction:
    """Classifier guidance bound to one target: the `guidance_fn(model_output, latents, t, scheduler)` of a sampler.

    Args:
        predict: the noise-aware model, `predict(vp_latents, log_snr) -> outputs` (differentiable).
        objective: `objective(outputs) -> log p(y | x)` per sample.
        scale: the guidance scale s.
        grad_rms: if set, each sample's gradient is rescaled to this root-mean-square before the scale.
        min_log_snr: the noisiest log-SNR the guidance strength is computed at (a rectified-flow sample at pure
            noise has log-SNR -inf, where the velocity form's factor is infinite).
    """

    def __init__(self, predict, objective, scale: float = 1.0, grad_rms: float | None = None, min_log_snr: float = SD_LOG_SNR_RANGE[0]):
        for name, value in (("scale", scale), ("grad_rms", grad_rms)):
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise TypeError(f"`{name}` must be a number, got {value!r:.100}.")
        if not math.isfinite(scale):
            raise ValueError(f"`scale` must be a finite number, got {scale}.")
        if grad_rms is not None and not (grad_rms > 0 and math.isfinite(grad_rms)):
            raise ValueError(f"`grad_rms` must be a finite number > 0, or None, got {grad_rms}.")
        self.predict, self.objective = predict, objective
        self.scale, self.grad_rms, self.min_log_snr = float(scale), grad_rms, float(min_log_snr)

    def gradient(self, latents: torch.Tensor, point: NoisePoint) -> torch.Tensor:
        """grad log p(y | x) with respect to the scheduler's own sample (the VP latent is `latents / vp_scale`)."""
        with torch.enable_grad():
            sample = latents.detach().float().requires_grad_(True)
            log_probability = self.objective(self.predict(sample / point.vp_scale, max(point.log_snr, self.min_log_snr)))
            (grad,) = torch.autograd.grad(log_probability.sum(), sample)
        return rescale_gradient(grad, self.grad_rms) if self.grad_rms is not None else grad

    def __call__(self, model_output: torch.Tensor, latents: torch.Tensor, timestep, scheduler) -> torch.Tensor:
        if self.scale == 0:
            return model_output
        point = noise_point(scheduler, timestep)
        grad = self.gradient(latents, point)
        point = NoisePoint(point.kind, max(point.log_snr, self.min_log_snr), point.vp_scale, point.velocity_direction)
        return apply_guidance(model_output, grad, point, self.scale)
