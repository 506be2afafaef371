"""Classifier guidance on a model's (CFG-combined) output, written once for each parameterisation.

Everything is put on one axis, the variance-preserving (VP) latent

    x = alpha x0 + sigma eps,   alpha^2 + sigma^2 = 1,   log-SNR lambda = log(alpha^2 / sigma^2),

where a DDPM-family scheduler's sample already lives (alpha^2 = alphas_cumprod[t]). Classifier guidance adds
the gradient g = grad_x log p(y | x) of a noise-aware guide to the score, grad_x log p(x) = -eps / sigma, so

    eps~ = eps - s sigma g                                                              (the epsilon form)

with the guidance scale s. The other parameterisations follow by holding the sample x fixed and rewriting the
same change of eps in their own variable (`guide_v_prediction`, `guide_sample_prediction`,
`guide_rectified_flow_velocity`, each derived in its docstring). All of them move the model's clean-latent
guess by the same amount, delta x0 = s (sigma^2 / alpha) g: which is why one scale carries across samplers.
"""

from __future__ import annotations

import math

import torch


def vp_log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """log(alpha^2 / sigma^2) of a DDPM schedule point, from `alphas_cumprod[t]`."""
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def rectified_flow_log_snr(flow_sigma: torch.Tensor) -> torch.Tensor:
    """The log-SNR of the straight path's x_r = (1 - r) x0 + r noise at r = `flow_sigma`: 2 log((1 - r) / r).

    Pure noise (r = 1) is -inf and clean data (r = 0) is +inf, as on the VP axis.
    """
    return 2 * (torch.log1p(-flow_sigma) - torch.log(flow_sigma))


def vp_coefficients(log_snr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of the VP point with this log-SNR: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def rectified_flow_to_vp_scale(flow_sigma: torch.Tensor) -> torch.Tensor:
    """c with x_r = c x_vp: the straight path at r is the VP point of the same log-SNR scaled by sqrt((1-r)^2 + r^2).

    x_r = (1 - r) x0 + r eps = c (alpha x0 + sigma eps) with alpha = (1 - r) / c and sigma = r / c, and
    alpha^2 + sigma^2 = 1 fixes c. So the expert (trained on VP latents) reads x_r / c.
    """
    return torch.sqrt((1 - flow_sigma) ** 2 + flow_sigma**2)


def guide_epsilon(epsilon: torch.Tensor, grad: torch.Tensor, sigma: torch.Tensor, scale: float) -> torch.Tensor:
    """eps~ = eps - s sigma g, with g the gradient of log p(y | x) at the VP sample x (ADM's `condition_score`)."""
    return epsilon - scale * sigma * grad


def guide_v_prediction(
    velocity: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, scale: float
) -> torch.Tensor:
    """v~ = v - s (sigma / alpha) g.

    Derivation: v = alpha eps - sigma x0 and x0 = (x - sigma eps) / alpha give
    v = (alpha^2 eps + sigma^2 eps - sigma x) / alpha = (eps - sigma x) / alpha. At fixed x, a change of eps by
    -s sigma g changes v by -s sigma g / alpha.
    """
    return velocity - scale * (sigma / alpha) * grad


def guide_sample_prediction(
    sample: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, scale: float
) -> torch.Tensor:
    """x0~ = x0 + s (sigma^2 / alpha) g.

    Derivation: x0 = (x - sigma eps) / alpha, so at fixed x a change of eps by -s sigma g changes x0 by
    +s sigma^2 g / alpha (Tweedie's formula with the guided score).
    """
    return sample + scale * (sigma**2 / alpha) * grad


def guide_rectified_flow_velocity(
    velocity: torch.Tensor,
    grad: torch.Tensor,
    flow_sigma: torch.Tensor,
    scale: float,
    velocity_direction: str = "noise_to_data",
) -> torch.Tensor:
    """u~ = u + s (r / (1 - r)) g_r for u = x0 - noise (InstaFlow, 2-RF); the opposite sign for noise - x0 (SD3).

    Here g_r = grad_{x_r} log p(y | x_r) is the gradient at the scheduler's own sample x_r = (1 - r) x0 + r eps.
    Derivation: with x_r = c x_vp (`rectified_flow_to_vp_scale`), g_r = g_vp / c and sigma = r / c, so the
    epsilon form's change is -s sigma g_vp = -s r g_r (the noise of x_r has std r: the same rule on x_r).
    Holding x_r fixed, eps = x_r - (1 - r) u, so u = (x_r - eps) / (1 - r) changes by +s r g_r / (1 - r).
    Check: x0 = x_r + r u moves by s r^2 g_r / (1 - r) = s (sigma^2 / alpha) g_vp, as in every other form.
    At r = 1 (pure noise) the factor is infinite; `PPAPGuidance` evaluates it at the log-SNR its experts end at.
    """
    change = scale * (flow_sigma / (1 - flow_sigma)) * grad
    return velocity + change if velocity_direction == "noise_to_data" else velocity - change


def rescale_gradient(grad: torch.Tensor, rms: float) -> torch.Tensor:
    """Each sample's gradient set to root-mean-square `rms` (PPAP's DeepFloyd variant normalises the gradient too).

    A guide's raw gradient can be tiny or huge depending on how sharp it is; fixed-norm gradients make one
    guidance scale mean the same step for any guide and any model. A zero gradient stays zero.
    """
    norms = grad.flatten(1).pow(2).mean(dim=1).sqrt().clamp_min(1e-12)
    return grad * (rms / norms).reshape(-1, *([1] * (grad.ndim - 1)))


def log_snr_edges(min_log_snr: float, max_log_snr: float, num_experts: int) -> list[float]:
    """`num_experts + 1` equally spaced log-SNR boundaries from the noisiest to the cleanest point, descending."""
    if num_experts < 1:
        raise ValueError(f"`num_experts` must be at least 1, got {num_experts}.")
    if not (math.isfinite(min_log_snr) and math.isfinite(max_log_snr) and min_log_snr < max_log_snr):
        raise ValueError(f"Need finite `min_log_snr` < `max_log_snr`, got {min_log_snr} and {max_log_snr}.")
    step = (max_log_snr - min_log_snr) / num_experts
    return [max_log_snr - i * step for i in range(num_experts + 1)]


def expert_index(log_snr: float, edges: list[float]) -> int:
    """Which range of `edges` (descending) holds `log_snr`: 0 is the cleanest. Beyond the ends, the end expert."""
    for i in range(len(edges) - 1):
        if log_snr >= edges[i + 1]:
            return i
    return len(edges) - 2
