"""Per-timestep weights for epsilon-prediction losses, in terms of the signal-to-noise ratio."""

from __future__ import annotations

import torch


def loss_weights(snr: torch.Tensor, snr_gamma: float, snr_floor: float, prediction_type: str) -> torch.Tensor:
    """Per-sample weights of the epsilon or v MSE, set by what they mean for the predicted image x0.

    The epsilon MSE is SNR x the x0 MSE and the v MSE is (SNR + 1) x the x0 MSE. Min-SNR gives x0
    errors the weight min(SNR, gamma) (Diffusers' `--snr_gamma`), which at t = 999 of SD's
    schedule (SNR 0.005) is ~200x below mid noise: the prompt is then ignored where layout and
    background are decided. The floor keeps that x0 weight at least `snr_floor`. 0 turns either off.
    """
    if prediction_type == "epsilon":
        x0_weight = snr.clone()
    elif prediction_type == "v_prediction":
        x0_weight = snr + 1
    else:
        raise ValueError(f"`prediction_type` must be 'epsilon' or 'v_prediction', got {prediction_type!r}.")
    unweighted = x0_weight.clone()
    if snr_gamma > 0:
        x0_weight = torch.clamp(snr, max=snr_gamma)
    if snr_floor > 0:
        x0_weight = torch.clamp(x0_weight, min=snr_floor)
    return x0_weight / unweighted
