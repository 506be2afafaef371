import numpy as np
import pytest

from fastgen_diffusers.shapes import build_dataset, render_attributes
from fastgen_diffusers.shapes.captions import Attributes
from fastgen_diffusers.shapes.fidelity import coverage_masks, drawing_distances, fit_drawing
from fastgen_diffusers.shapes.metrics import drawing_fd
from fastgen_diffusers.shapes.render import HALF_EXTENTS


@pytest.fixture(scope="module")
def rows():
    return build_dataset(60, seed=5, split="eval")[:]


def test_clean_drawings_are_at_distance_near_zero(rows):
    images = np.stack([np.asarray(image) for image in rows["image"]])
    distances = drawing_distances(images, rows["shape"])
    assert distances.mean() < 1.5 and distances.max() < 4.0, distances
    # The wrong shape is far: the distance sees geometry, not only colour.
    wrong = drawing_distances(images, ["square" if s == "circle" else "circle" for s in rows["shape"]])
    assert np.median(wrong - distances) > 2.0


def test_fit_recovers_the_drawing():
    attributes = Attributes("large", "orange", "triangle", "bottom right", "dark gray")
    fit = fit_drawing(np.asarray(render_attributes(attributes, seed=3)), "triangle")
    rng = np.random.default_rng(3)  # the renderer's draws, in its order
    grey = 64 + rng.integers(-6, 7)
    colour = np.clip(np.array([250, 140, 20]) + rng.integers(-12, 13, 3), 0, 255)
    cx, cy = 25 + rng.uniform(-1, 1), 25 + rng.uniform(-1, 1)
    r = HALF_EXTENTS["large"] * rng.uniform(0.95, 1.05)
    assert fit.centre == pytest.approx((cx, cy), abs=0.2)
    assert fit.half_extent == pytest.approx(r, abs=0.2)
    assert fit.background == pytest.approx(grey, abs=2)
    assert np.allclose(fit.colour, colour, atol=4)
    assert fit.unexplained_pixels == 0


def test_off_palette_colour_and_noise_raise_the_distance(rows):
    image = np.asarray(rows["image"][0]).astype(np.int16)
    clean = fit_drawing(image.astype(np.uint8), rows["shape"][0]).distance
    noisy = np.clip(image + np.random.default_rng(0).normal(0, 30, image.shape), 0, 255).astype(np.uint8)
    assert fit_drawing(noisy, rows["shape"][0]).distance > clean + 15


def test_coverage_is_the_shape_area():
    masks = coverage_masks("square", [16.0], [16.0], [4.0])
    assert masks.sum().item() == pytest.approx(64.0, abs=1e-3)
    circle = coverage_masks("circle", [16.0], [16.0], [5.0]).sum().item()
    assert circle == pytest.approx(np.pi * 25, rel=0.02)


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match="shape"):
        fit_drawing(np.zeros((32, 32, 3), dtype=np.uint8), "star")


def test_drawing_fd_is_zero_on_itself_and_sees_collapse(rows):
    images = np.stack([np.asarray(image) for image in rows["image"]])
    fits = [fit_drawing(i, s) for i, s in zip(images, rows["shape"])]
    other = build_dataset(60, seed=6, split="eval")[:]
    other_fits = [fit_drawing(np.asarray(i), s) for i, s in zip(other["image"], other["shape"])]
    collapsed = [render_attributes(Attributes("small", "red", "circle", "center", "gray"), s) for s in range(60)]
    collapsed_fits = [fit_drawing(np.asarray(i), "circle") for i in collapsed]
    assert drawing_fd(fits, fits) == pytest.approx(0.0, abs=1e-6)
    assert drawing_fd(other_fits, fits) * 3 < drawing_fd(collapsed_fits, fits)
