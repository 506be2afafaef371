"""The maths of variational score distillation (SwiftBrush) with SNOOPI's random guidance scales (PG-SB).

A one-step student G maps noise z to x0 = G(z, y). The frozen teacher's score and a "fake" score, a
LoRA teacher trained to denoise the student's own samples, are compared on x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps:

    grad = w(t) (eps_teacher(x_t, t, y; kappa) - eps_fake(x_t, t, y; kappa)),   w(t) = sigma_t^2 = 1 - a_t

(or DMD2's x0-space, per-sample normalised version of the same difference), and the student descends
0.5 ||x0 - stopgrad(x0 - grad)||^2, whose gradient with respect to x0 is `grad` (up to the mean's 1 / numel).
Both scores use classifier-free guidance with the same per-sample scale kappa ~ U(kappa_min, kappa_max): PG-SB's
fix of SwiftBrush's fixed scale, whose training oscillates on SD1.5.
kappa_min == kappa_max is the fixed-scale VSD ablation.

The student's x0 and the noising x_t come from [`OneStepScheduler`] (`predict_original_sample`, `add_noise`), the
scheduler the student samples with. Every function here works in float32 whatever the model dtype: under bf16, a_t
near 1 is quantised in steps of 2^-9, which corrupts sigma_t^2 at small t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped to broadcast over a (B, C, H, W) batch."""
    return values.float().reshape(-1, *([1] * (like.ndim - 1)))


def sample_guidance_scales(
    batch_size: int,
    minimum: float,
    maximum: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample guidance scales kappa ~ U(`minimum`, `maximum`), shape (B,), float32.

    Per sample rather than per batch: the SNOOPI paper does not say which, and per sample lets every batch cover
    the range. `minimum` == `maximum` gives SwiftBrush's fixed scale.
    """
    if not 0 <= minimum <= maximum:
        raise ValueError(f"Guidance scales need 0 <= `minimum` <= `maximum`, got {minimum} and {maximum}.")
    uniform = torch.rand(batch_size, device=device, generator=generator, dtype=torch.float32)
    return minimum + (maximum - minimum) * uniform


def classifier_free_guidance(
    unconditional: torch.Tensor, conditional: torch.Tensor, guidance_scale: torch.Tensor
) -> torch.Tensor:
    """uncond + kappa (cond - uncond) with one kappa per sample (`guidance_scale` of shape (B,)), in float32.

    Linear in the model output, so it may be applied to epsilon, v or x0 predictions alike before converting.
    """
    unconditional, conditional = unconditional.float(), conditional.float()
    return unconditional + _per_sample(guidance_scale, conditional) * (conditional - unconditional)


def predicted_noise(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """epsilon from one model evaluation on x_t = sqrt(a) x0 + sqrt(1 - a) eps, in float32.

    VSD compares scores, i.e. noise predictions; this lets v-prediction and sample-prediction teachers take part.
    `alpha_prod_t` broadcasts against `sample` (a scalar, or (B, 1, 1, 1)).
    """
    model_output, sample = model_output.float(), sample.float()
    alpha = alpha_prod_t.float() ** 0.5
    sigma = (1 - alpha_prod_t.float()) ** 0.5
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * sample
    if prediction_type == "sample":
        return (sample - alpha * model_output) / sigma
    raise ValueError(
        f"`prediction_type` {prediction_type!r} is not supported; use 'epsilon', 'v_prediction' or 'sample'."
    )


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    min_ratio: float = 0.0,
    max_ratio: float = 1.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integer timesteps uniform in [min_ratio T, max_ratio T), shape (B,).

    VSD uses SwiftBrush's [0.02 T, 0.981 T) = [20, 981): at the ends the teacher and fake scores barely differ
    (t -> 0) or carry no information about x0 (t -> T). The fake score trains on the full [0, T).
    """
    low, high = int(min_ratio * num_train_timesteps), int(max_ratio * num_train_timesteps)
    if not 0 <= low < high <= num_train_timesteps:
        raise ValueError(
            f"Timestep ratios must satisfy 0 <= `min_ratio` < `max_ratio` <= 1 and leave at least one timestep, got"
            f" {min_ratio} and {max_ratio} for {num_train_timesteps} timesteps."
        )
    return torch.randint(low, high, (batch_size,), device=device, generator=generator)


def guided_noise(
    unet: torch.nn.Module,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    unconditional_embeds: torch.Tensor,
    guidance_scale: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """Classifier-free-guided epsilon with per-sample scales, from one UNet call on the doubled batch (float32).

    `unconditional_embeds` are the null prompt's, or a negative prompt's (NASA-T's teacher)."""
    model_output = unet(
        torch.cat([sample, sample]),
        torch.cat([timesteps, timesteps]),
        torch.cat([unconditional_embeds, prompt_embeds]),
    ).sample
    unconditional, conditional = model_output.chunk(2)
    guided = classifier_free_guidance(unconditional, conditional, guidance_scale)
    return predicted_noise(guided, sample, _per_sample(alphas_cumprod[timesteps], sample), prediction_type)


def vsd_gradient(
    teacher_noise: torch.Tensor, fake_noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """SwiftBrush's VSD gradient on x0: w(t) (eps_teacher - eps_fake) with w(t) = sigma_t^2 = 1 - a_t.

    NaNs and infinities (a diverging fake score) become 0 / finite, as in SwiftBrush and DMD2, so one bad sample
    cannot poison the student. The weighting matters for the learning rate: DMD2's x0-space normalisation
    (`dmd_gradient`) is not interchangeable with it.
    """
    weight = _per_sample(1 - alphas_cumprod[timesteps], teacher_noise)
    return torch.nan_to_num(weight * (teacher_noise.float() - fake_noise.float()))


def dmd_gradient(
    teacher_noise: torch.Tensor,
    fake_noise: torch.Tensor,
    original_sample: torch.Tensor,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """DMD2's distribution-matching gradient on x0: (x0_fake - x0_teacher) / mean|x0 - x0_teacher| per sample.

    The same direction as `vsd_gradient` (x0_teacher - x0_fake = sigma_t / alpha_t (eps_fake - eps_teacher)), but
    weighted in x0 space and normalised per sample, so noisy timesteps, where layout and colour are decided, weigh
    sigma_t / alpha_t (14 at SD's t = 980) where SwiftBrush's sigma_t^2 in epsilon space weighs them ~1 and their
    epsilon difference is small. `original_sample` is the student's x0, `sample` the x_t both scores saw. Tuned
    learning rates differ (DMD2 SD1.5: 1e-5, SwiftBrush: 1e-6).
    """
    alpha_prod_t = _per_sample(alphas_cumprod[timesteps], sample)
    sample = sample.float()

    def x0_from_noise(noise: torch.Tensor) -> torch.Tensor:
        return (sample - (1 - alpha_prod_t) ** 0.5 * noise.float()) / alpha_prod_t**0.5

    teacher_x0, fake_x0 = x0_from_noise(teacher_noise), x0_from_noise(fake_noise)
    normaliser = (
        (original_sample.detach().float() - teacher_x0).abs().mean(dim=tuple(range(1, sample.ndim)), keepdim=True)
    )
    return torch.nan_to_num((fake_x0 - teacher_x0) / normaliser)


def vsd_loss(original_sample: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """0.5 ||x0 - stopgrad(x0 - grad)||^2 averaged over elements: a surrogate whose gradient with respect to x0 is
    `gradient` / x0.numel(), so backpropagation carries the score difference into the student.

    Its value is 0.5 mean(grad^2), a measure of how far the student's distribution is from the teacher's, not
    something that decreases like a regression loss.
    """
    original_sample = original_sample.float()
    target = (original_sample - gradient.float()).detach()
    return 0.5 * F.mse_loss(original_sample, target)


def fake_score_loss(
    model_output: torch.Tensor,
    noise: torch.Tensor,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """Denoising loss of the fake score on (detached) student samples: mean of a_t ||eps_hat - eps||^2.

    SwiftBrush's `mse(alpha_t * eps_hat, alpha_t * eps)`: weighting by a_t = alpha_t^2 keeps the near-pure-noise
    timesteps, where epsilon errors are large and uninformative, from dominating. `sample` is the x_t the model
    saw, needed to read epsilon from v or sample predictions.
    """
    alpha_prod_t = _per_sample(alphas_cumprod[timesteps], sample)
    error = predicted_noise(model_output, sample, alpha_prod_t, prediction_type) - noise.float()
    return (alpha_prod_t * error**2).mean()
