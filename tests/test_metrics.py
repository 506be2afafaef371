import numpy as np
import pytest

from fastgen_diffusers.shapes import Attributes, render
from fastgen_diffusers.shapes.metrics import attribute_adherence, attribute_rate, brightness_error, frechet_distance


def test_frechet_distance_of_identical_sets_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 16))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_shifted_gaussians_is_squared_shift():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4000, 8))
    shift = np.full(8, 0.5)
    assert frechet_distance(features, features + shift) == pytest.approx(float((shift**2).sum()), rel=1e-6)
    # Same mean, doubled std: trace(C1 + C2 - 2 sqrt(C1 C2)) = d (1 + 4 - 4) = d.
    assert frechet_distance(features, 2 * features) == pytest.approx(8.0, rel=0.05)


def test_attribute_adherence_counts_only_named_attributes():
    prompted = [
        Attributes(colour="red", shape="circle"),
        Attributes(colour="red", shape="square"),
        Attributes(size="small", colour="blue", shape="cross", position="top", background="white"),
        Attributes(shape="triangle"),
    ]
    predicted = [
        Attributes(size="large", colour="red", shape="circle", position="left", background="black"),
        Attributes(size="large", colour="red", shape="circle", position="left", background="black"),
        Attributes(size="small", colour="green", shape="cross", position="top", background="white"),
        Attributes(size="small", colour="green", shape="triangle", position="top", background="white"),
    ]
    scores = attribute_adherence(predicted, prompted)
    assert scores["shape"] == pytest.approx(3 / 4)
    assert scores["colour"] == pytest.approx(2 / 3)
    assert scores["size"] == 1.0 and scores["position"] == 1.0 and scores["background"] == 1.0
    assert scores["all"] == pytest.approx(2 / 4)


def test_attribute_adherence_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="predicted"):
        attribute_adherence([Attributes()], [])


def test_brightness_error_on_known_backgrounds():
    prompted = [Attributes(background="black"), Attributes(background="white"), Attributes(background="gray")]
    images = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    images[0] += 10  # black asked, grey level 10 drawn
    images[1] += 235  # white asked, 235 drawn
    images[2] += 0  # not a black/white prompt: ignored
    assert brightness_error(images, prompted) == pytest.approx(15.0)
    with pytest.raises(ValueError, match="background"):
        brightness_error(images[2:], prompted[2:])


def test_brightness_error_is_small_on_real_images():
    captions = ["a small red circle on a black background", "a large blue square on a white background"]
    images = [render(c, seed) for seed in range(10) for c in captions]
    prompted = [Attributes(background=b) for _ in range(10) for b in ("black", "white")]
    assert brightness_error(images, prompted) < 6.0  # the seeded jitter is at most 6 levels


def test_attribute_rate():
    predicted = [Attributes(colour="red"), Attributes(colour="blue"), Attributes(colour="red"), Attributes()]
    assert attribute_rate(predicted, "colour", "red") == 0.5
    with pytest.raises(ValueError, match="name"):
        attribute_rate(predicted, "hue", "red")
