"""InstaFlow's training maths and its store of (noise, latent) pairs.

The straight path, its target velocity and the UNet time are [`RectifiedFlowEulerScheduler`]'s (`scale_noise`,
`get_velocity`, timesteps sigma * 1000), the scheduler the trained model samples with. In InstaFlow's words, flow
time tau = 1 - sigma runs from 0 (x0, standard normal noise) to 1 (x1, the teacher's image latent); the path is
x_tau = tau * x1 + (1 - tau) * x0; the UNet predicts the velocity x1 - x0 and is told the time (1 - tau) * 1000.

Pairs are written in shards, `shard-00000.parquet`, ..., each holding consecutive sample indices: the index,
the exact noise the teacher started from, the latent it reached, and the prompt. A shard appears under its
final name only once complete, so an interrupted generation resumes shard by shard.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling
from transformers import PreTrainedTokenizerBase

from ..utils.safe_loading import check_parquet
from .data import tokenize

PAIRS_CONFIG_FILE = "reflow_pairs.json"  # everything that decides a pair's content, beside the shards
SHARD_NAME = "shard-{:05d}.parquet"
_SHARD_PATTERN = re.compile(r"^shard-(\d{5})\.parquet$")
LOSSES = ("l2", "pseudo_huber", "lpips")
TIME_SAMPLINGS = ("uniform", "u_shaped", "logit_normal")


# ----------------------------------------------------------------------------- the one-step student


def one_step_sample(noise: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """x1_hat = x0 + v(x0, 1000): one Euler step over the whole path, what the distilled student returns."""
    return noise + velocity


# ----------------------------------------------------------------------------- training times


def u_shaped_noise_levels(batch_size: int, a: float = 4.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise levels sigma in (0, 1) with density proportional to exp(a sigma) + exp(a (1 - sigma)).

    The U-shaped distribution of Lee et al., "Improving the Training of Rectified Flows" (2405.20320): after one
    reflow the straight-line targets are hardest to fit at both ends of the path, near pure noise (where the
    image's layout and its open attributes are decided) and near the data, so training time goes there. Drawn
    by inverting the CDF of exp(a sigma) on [0, 1], then mirrored for half the batch.
    """
    if a <= 0:
        raise ValueError(f"`a` (the U-shape's sharpness) must be positive, got {a}.")
    u = torch.rand(batch_size, device=device)
    sigma = torch.log1p(u * math.expm1(a)) / a
    mirrored = torch.rand(batch_size, device=device) < 0.5
    return torch.where(mirrored, 1.0 - sigma, sigma)


def sample_noise_levels(
    name: str,
    batch_size: int,
    device: torch.device | str = "cpu",
    u_shape_a: float = 4.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """The training noise levels sigma (1 = pure noise) of the 2-RF loss, one per sample.

    "uniform" is InstaFlow's; "u_shaped" is Lee et al.'s; "logit_normal" is SD3's (Diffusers'
    `compute_density_for_timestep_sampling`), where a positive `logit_mean` favours high noise.
    """
    if name == "uniform":
        return 1.0 - torch.rand(batch_size, device=device)  # tau = 1 - sigma ~ U(0, 1), as the shipped models drew it
    if name == "u_shaped":
        return u_shaped_noise_levels(batch_size, u_shape_a, device)
    if name == "logit_normal":
        return compute_density_for_timestep_sampling(
            "logit_normal", batch_size, logit_mean=logit_mean, logit_std=logit_std, device=device
        )
    raise ValueError(f"`time_sampling` must be one of {TIME_SAMPLINGS}, got {name!r}.")


# ----------------------------------------------------------------------------- losses


def l2_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, shape (B,), computed in fp32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def default_huber_c(num_dims: int) -> float:
    """c = 0.00054 * sqrt(d), the constant of "Improved Techniques for Training Consistency Models" (Song & Dhariwal).

    It scales with the norm of a d-dimensional difference, so the loss turns from quadratic to linear
    at the same relative error whatever the latent size.
    """
    return 0.00054 * math.sqrt(num_dims)


def pseudo_huber_loss(prediction: torch.Tensor, target: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """sqrt(||prediction - target||^2 + c^2) - c per sample, shape (B,), computed in fp32.

    Quadratic for small errors and linear for large ones, so a few bad pairs (the teacher's failures)
    do not dominate the gradient. The norm is over a whole sample as in the consistency-model paper;
    `c` defaults to `default_huber_c` of the sample's size.
    """
    difference = (prediction.float() - target.float()).flatten(1)
    if c is None:
        c = default_huber_c(difference.shape[1])
    squared = difference.pow(2).sum(dim=1)
    # = sqrt(squared + c^2) - c, without the cancellation that rounds small errors to 0 in fp32
    return squared / (torch.sqrt(squared + c**2) + c)


def latent_loss(
    name: str, prediction: torch.Tensor, target: torch.Tensor, huber_c: float | None = None
) -> torch.Tensor:
    """The per-sample loss `name` ("l2" or "pseudo_huber") between two latent batches."""
    if name == "l2":
        return l2_loss(prediction, target)
    if name == "pseudo_huber":
        return pseudo_huber_loss(prediction, target, huber_c)
    raise ValueError(f"`loss` must be 'l2' or 'pseudo_huber' on latents, got {name!r}.")


def load_lpips(net: str = "vgg") -> torch.nn.Module:
    """LPIPS (the `lpips` package, frozen), imported only when asked for: it is not a dependency of the package."""
    try:
        import lpips
    except ImportError as error:
        raise ImportError("`--loss lpips` needs the `lpips` package: `pip install lpips`.") from error
    return lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)


def lpips_loss(lpips_model: torch.nn.Module, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LPIPS per sample, shape (B,), between images in [-1, 1].

    VGG's features of a small image are a few pixels wide, so images under 224 pixels are upsampled
    to 224 first, as one-step distillation code on CIFAR-sized data does.
    """
    if min(prediction.shape[-2:]) < 224:
        prediction = F.interpolate(prediction.float(), size=224, mode="bilinear", align_corners=False)
        target = F.interpolate(target.float(), size=224, mode="bilinear", align_corners=False)
    return lpips_model(prediction.float(), target.float()).flatten()


# ----------------------------------------------------------------------------- the pairs store


def read_pairs_config(pairs_dir: str | Path) -> dict:
    """The settings the pairs in `pairs_dir` were made with ({} for pairs without a record)."""
    path = Path(pairs_dir) / PAIRS_CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def check_pairs_config(pairs_dir: str | Path, config: dict) -> None:
    """Refuse to add shards to pairs made with other settings: the set would mix two couplings."""
    saved = read_pairs_config(pairs_dir)
    if not saved:
        return
    changed = {
        k: (saved.get(k), config.get(k)) for k in sorted(saved.keys() | config.keys()) if saved.get(k) != config.get(k)
    }
    if changed:
        raise ValueError(
            f"`--output_dir` {str(pairs_dir)!r} holds pairs made with other settings (saved, now): {changed}. "
            "Pass the same flags to resume, or a new `--output_dir`."
        )


def num_shards(num_pairs: int, shard_size: int) -> int:
    return math.ceil(num_pairs / shard_size)


def shard_indices(shard: int, num_pairs: int, shard_size: int) -> range:
    """The sample indices shard `shard` holds: consecutive, the last shard possibly shorter."""
    return range(shard * shard_size, min((shard + 1) * shard_size, num_pairs))


def shard_path(pairs_dir: str | Path, shard: int) -> Path:
    return Path(pairs_dir) / SHARD_NAME.format(shard)


def complete_shards(pairs_dir: str | Path) -> list[int]:
    """Shards written in full (a `*.partial` file is an interrupted write and does not count), in order."""
    pairs_dir = Path(pairs_dir)
    if not pairs_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in pairs_dir.iterdir() if (m := _SHARD_PATTERN.match(p.name)))


def write_pair_shard(
    pairs_dir: str | Path,
    shard: int,
    indices: Sequence[int],
    noise: torch.Tensor,
    latents: torch.Tensor,
    prompts: Sequence[str],
) -> Path:
    """Write one shard atomically: to `*.partial`, then renamed, so a killed job never leaves a shard half written.

    Tensors are stored as float32 (exact for fp16/bf16 inputs). A non-finite noise or latent raises instead of
    being written: one NaN pair silently poisons every training step that draws it.
    """
    if not len(indices) == len(prompts) == noise.shape[0] == latents.shape[0]:
        raise ValueError(
            f"A shard needs one index, prompt, noise and latent per sample, got {len(indices)}, {len(prompts)}, "
            f"{noise.shape[0]} and {latents.shape[0]}."
        )
    for name, tensor in (("noise", noise), ("latent", latents)):
        if not torch.isfinite(tensor).all():
            bad = [indices[i] for i in (~torch.isfinite(tensor)).flatten(1).any(dim=1).nonzero().flatten().tolist()]
            raise FloatingPointError(f"Shard {shard}: the {name} of samples {bad} is not finite; nothing was written.")
    noise, latents = noise.detach().float().cpu(), latents.detach().float().cpu()
    features = datasets.Features(
        {
            "index": datasets.Value("int64"),
            "prompt": datasets.Value("string"),
            "noise": datasets.Array3D(tuple(noise.shape[1:]), "float32"),
            "latent": datasets.Array3D(tuple(latents.shape[1:]), "float32"),
        }
    )
    table = datasets.Dataset.from_dict(
        {"index": list(indices), "prompt": list(prompts), "noise": noise.numpy(), "latent": latents.numpy()},
        features=features,
    )
    path = shard_path(pairs_dir, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    table.to_parquet(str(partial))
    os.replace(partial, path)
    return path


def load_pairs(
    pairs_dir: str | Path, cache_dir: str | None = None, shards: Sequence[int] | None = None
) -> datasets.Dataset:
    """Every complete shard (or only `shards`, in that order) through `datasets` (columns index, prompt, noise,
    latent).

    `cache_dir` is `datasets`' cache for the Arrow copy (default: its own, `HF_DATASETS_CACHE`).
    """
    pairs_dir = Path(pairs_dir)
    if not pairs_dir.is_dir():
        raise ValueError(f"`pairs_dir` {str(pairs_dir)!r} is not a folder; write pairs with generate_reflow_pairs.py.")
    complete = complete_shards(pairs_dir)
    if not complete:
        raise ValueError(f"`pairs_dir` {str(pairs_dir)!r} holds no complete shard ({SHARD_NAME.format(0)}, ...).")
    missing = sorted(set(shards or ()) - set(complete))
    if missing:
        raise ValueError(f"`pairs_dir` {str(pairs_dir)!r} has no complete shard {missing}.")
    shards = complete if shards is None else list(shards)
    files = [str(shard_path(pairs_dir, shard)) for shard in shards]
    for file in files:  # a damaged shard is named here, not deep inside datasets' Arrow conversion
        check_parquet(Path(file))
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)


class PairCollator:
    """Collate pair rows into fp32 `noise` and `latents` and the prompts' token ids."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return {
            "noise": torch.stack([torch.as_tensor(row["noise"], dtype=torch.float32) for row in rows]),
            "latents": torch.stack([torch.as_tensor(row["latent"], dtype=torch.float32) for row in rows]),
            "input_ids": tokenize(self.tokenizer, [row["prompt"] for row in rows]),
        }
