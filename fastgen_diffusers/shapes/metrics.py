"""ShapesWorld metrics: plain functions over judged attributes, features and images."""

from __future__ import annotations

import numpy as np
from scipy import linalg

from .captions import ATTRIBUTE_NAMES, BACKGROUNDS, Attributes
from .judge import background_brightness, to_uint8_array


def attribute_adherence(predicted: list[Attributes], prompted: list[Attributes]) -> dict[str, float]:
    """Per attribute: the share of images whose judged value equals the one the prompt names.

    Only prompts that name an attribute count for it. `all` is the share of images with every
    named attribute right.
    """
    if len(predicted) != len(prompted):
        raise ValueError(f"`predicted` has {len(predicted)} entries but `prompted` has {len(prompted)}.")
    if not prompted:
        raise ValueError("`prompted` must not be empty.")
    scores: dict[str, float] = {}
    for name in ATTRIBUTE_NAMES:
        pairs = [(getattr(p, name), getattr(q, name)) for p, q in zip(predicted, prompted) if getattr(q, name) is not None]
        if pairs:
            scores[name] = sum(p == q for p, q in pairs) / len(pairs)
    scores["all"] = sum(
        all(getattr(q, n) is None or getattr(p, n) == getattr(q, n) for n in ATTRIBUTE_NAMES)
        for p, q in zip(predicted, prompted)
    ) / len(prompted)
    return scores


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula)."""
    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        offset = np.eye(cov_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def shapes_fd(judge, generated, real) -> float:
    """The Frechet distance between generated and real images in the judge CNN's 128-d feature space.

    Kept for comparison with earlier tables only: its ranking disagrees with the exact fidelity measure, and its
    covariance is singular below 129 images (`docs/open-prompts.md`). Use `drawing_fd`.
    """
    return frechet_distance(judge.features(generated), judge.features(real))


def drawing_fd(generated_fits: list, real_fits: list) -> float:
    """Frechet distance between generated and real images in the space of their nearest clean drawings.

    Each image is described by its fitted drawing (`fidelity.DrawingFit.features`: centre, half extent, fill
    colour, background grey, distance to the drawing), standardised by the real images' spread, so every
    dimension counts alike and 8 dimensions keep the covariance well defined at n = 100.
    """
    generated = np.stack([f.features() for f in generated_fits])
    real = np.stack([f.features() for f in real_fits])
    mean, scale = real.mean(axis=0), real.std(axis=0) + 1.0  # +1: the real distances are nearly constant
    return frechet_distance((generated - mean) / scale, (real - mean) / scale)


def brightness_error(images, prompted: list[Attributes], backgrounds: tuple[str, ...] = ("black", "white")) -> float:
    """Mean absolute error (grey levels, 0-255) of the background brightness, on prompts asking for `backgrounds`."""
    array = to_uint8_array(images)
    errors = [
        abs(background_brightness(image) - BACKGROUNDS[q.background])
        for image, q in zip(array, prompted)
        if q.background in backgrounds
    ]
    if not errors:
        raise ValueError(f"No prompt asks for a background in {list(backgrounds)}.")
    return float(np.mean(errors))


def attribute_rate(predicted: list[Attributes], name: str, value: str) -> float:
    """Share of images judged to have `name` == `value` (e.g. how often a negative-prompted colour still appears)."""
    if name not in ATTRIBUTE_NAMES:
        raise ValueError(f"`name` must be one of {list(ATTRIBUTE_NAMES)}, got {name!r}.")
    if not predicted:
        raise ValueError("`predicted` must not be empty.")
    return sum(getattr(p, name) == value for p in predicted) / len(predicted)
