"""Loss weights of the teacher's objective, checked against their meaning for the predicted image x0."""

import pytest
import torch

from fastgen_diffusers.training.snr_weighting import loss_weights


SNR = torch.tensor([0.005, 0.05, 0.5, 5.0, 50.0])
# x0 MSE = epsilon MSE / SNR = v MSE / (SNR + 1): the weight x0 errors get under each objective.
TO_X0 = {"epsilon": SNR, "v_prediction": SNR + 1}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_plain_mse_when_both_off(prediction_type):
    assert torch.equal(loss_weights(SNR, 0.0, 0.0, prediction_type), torch.ones(5))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gives_x0_errors_the_weight_min_snr_gamma(prediction_type):
    x0_weight = loss_weights(SNR, 5.0, 0.0, prediction_type) * TO_X0[prediction_type]
    assert torch.allclose(x0_weight, torch.tensor([0.005, 0.05, 0.5, 5.0, 5.0]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_floor_raises_the_x0_weight_at_high_noise_only(prediction_type):
    x0_weight = loss_weights(SNR, 5.0, 0.2, prediction_type) * TO_X0[prediction_type]
    assert torch.allclose(x0_weight, torch.tensor([0.2, 0.2, 0.5, 5.0, 5.0]))


def test_epsilon_weight_at_the_last_timestep():
    # At t = 999 of SD's schedule (SNR ~0.005) a floor of 0.2 weighs the epsilon MSE ~40x.
    assert loss_weights(torch.tensor([0.005]), 5.0, 0.2, "epsilon").item() == pytest.approx(40.0)


def test_unknown_prediction_type_is_named():
    with pytest.raises(ValueError, match="prediction_type"):
        loss_weights(SNR, 5.0, 0.0, "sample")
