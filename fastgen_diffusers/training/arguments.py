"""Command-line flags every fastgen training script shares, named as in Diffusers' training examples."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .. import assets
from ..pipelines.negative_attention import METHOD_DEFAULTS
from .checkpointing import resolve_resume_path


def training_parser(description: str) -> argparse.ArgumentParser:
    """A training script's parser: its docstring as the description, and the flags every script shares."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_common_training_args(parser)


def add_common_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", type=str, required=True, help="Where checkpoints and the final model go.")
    group.add_argument("--seed", type=int, default=0, help="Seed for data order, initialisation and validation.")
    group.add_argument("--max_train_steps", type=int, required=True, help="Total optimisation steps.")
    group.add_argument("--train_batch_size", type=int, default=64, help="Batch size per process.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    group.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet.")
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    group.add_argument("--report_to", type=str, default=None, help="An accelerate tracker (tensorboard, wandb).")

    group = parser.add_argument_group("checkpointing")
    group.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save the full training state every N steps."
    )
    group.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep at most this many checkpoints.")
    group.add_argument(
        "--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint-N folder to resume from."
    )

    group = parser.add_argument_group("validation")
    group.add_argument("--validation_steps", type=int, default=500, help="Write validation images every N steps.")
    group.add_argument("--num_validation_images", type=int, default=8)

    group = parser.add_argument_group("hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the final model and its card to the Hub.")
    group.add_argument("--hub_model_id", type=str, default=None, help="Repository id, e.g. `user/shapes-teacher`.")
    group.add_argument("--hub_token", type=str, default=None)
    return parser


def add_pretrained_model_arg(parser: argparse.ArgumentParser, help: str) -> argparse._ArgumentGroup:
    """The `model` group, with `--pretrained_model_name_or_path` (a folder, Hub id or embedded model name)."""
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", type=str, required=True, help=help)
    return group


def add_nasa_scale_arg(group: argparse._ArgumentGroup) -> None:
    """`--nasa_scale`: the trained model's default NASA scale, stored in its pipeline config."""
    group.add_argument(
        "--nasa_scale",
        type=float,
        default=METHOD_DEFAULTS["nasa"]["scale"],
        help="Default NASA scale for negative prompts at guidance <= 1, stored in the output pipeline's config.",
    )


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Reject a flag among `names` that is not above zero (each entry of a list flag), naming it (None: unset)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and any(v <= 0 for v in (value if isinstance(value, list) else [value])):
            raise ValueError(f"`--{name}` must be positive, got {value}.")


def check_non_negative(args: argparse.Namespace, *names: str) -> None:
    """Reject a flag among `names` below zero, naming it (None: unset)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ValueError(f"`--{name}` must be >= 0, got {value}.")


def check_fraction(args: argparse.Namespace, *names: str) -> None:
    """Reject a flag among `names` outside [0, 1], naming it."""
    for name in names:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"`--{name}` must lie in [0, 1], got {getattr(args, name)}.")


# Flags several scripts have under the same name; wherever a script has one, its value must lie in the range.
POSITIVE_FLAGS = (
    "max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
    "checkpoints_total_limit", "validation_steps", "batch_size", "generation_batch_size", "num_train_samples",
    "num_eval_samples", "num_pairs", "num_generated", "shard_size", "num_inference_steps", "resolution",
    "lora_rank", "lora_alpha", "fake_lora_rank", "fake_lora_alpha", "num_experts", "max_grad_norm",
    "block_out_channels", "layers_per_block", "attention_head_dim", "norm_num_groups",
    "decoder_block_out_channels", "num_decoder_blocks", "fake_updates_per_step",
)  # fmt: skip
NON_NEGATIVE_FLAGS = (
    "seed", "dataloader_num_workers", "num_validation_images", "lr_warmup_steps", "weight_decay", "kl_weight",
    "noise_std", "latent_noise_std", "edge_loss_weight", "level_loss_weight", "snr_gamma", "vae_train_steps",
)  # fmt: skip
# Flags that name a model: an embedded name, a folder, or a Hub id (checked at load). A value that can only be a
# local path (absolute, ./ or ../, or with more than one "/") must exist.
MODEL_FLAGS = ("pretrained_model_name_or_path", "guide_path", "vae_from", "init_decoder", "generated_latents_from")
# Flags that name an input folder, which must exist.
FOLDER_FLAGS = ("train_data_dir", "pairs_dir")


def check_shared_flags(args: argparse.Namespace) -> None:
    """The checks every script's flags get by name, before any model loads: finite numbers, positive learning
    rates, counts and sizes in range, model locations that can exist, input folders that do, and a
    `--resume_from_checkpoint` that names a whole checkpoint."""
    flags = vars(args)
    for name, value in flags.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"`--{name}` must be a finite number, got {value}.")
        if name.endswith("learning_rate") and value is not None and not value > 0:
            raise ValueError(f"`--{name}` must be positive, got {value}.")
    check_positive(args, *(name for name in POSITIVE_FLAGS if name in flags))
    check_non_negative(args, *(name for name in NON_NEGATIVE_FLAGS if name in flags))
    for name in MODEL_FLAGS:
        value = flags.get(name)
        for location in value if isinstance(value, list) else [value]:
            if location is not None and is_missing_local_path(location):
                raise ValueError(
                    f"`--{name}` {location!r} does not exist; give a folder, an embedded model"
                    f" ({', '.join(assets.names())}) or a Hub id."
                )
    for name in FOLDER_FLAGS:
        if name == "train_data_dir" and flags.get("dataset_name") is not None:
            continue  # both given: the script says to give exactly one, the more useful error
        if flags.get(name) is not None and not Path(flags[name]).is_dir():
            raise ValueError(f"`--{name}` {flags[name]!r} is not a folder.")
    output_dir = flags.get("output_dir")
    if output_dir is not None:
        path = Path(output_dir)
        blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise ValueError(f"`--output_dir` {output_dir!r}: {str(blocking)!r} is a file; give a folder.")
    if flags.get("resume_from_checkpoint") not in (None, "latest"):
        # The folder must exist and be whole now, not after the models have loaded.
        resolve_resume_path(output_dir, flags["resume_from_checkpoint"])


def is_missing_local_path(location: str) -> bool:
    """True for a path that can only mean a local folder and does not exist (a Hub id is `name` or `user/name`)."""
    path = Path(location)
    local = path.is_absolute() or location.startswith((".", "~")) or location.count("/") > 1
    return local and not path.expanduser().exists() and location not in assets.names()


def check_common_training_args(args: argparse.Namespace) -> None:
    """Reject values no run could use, naming the flag."""
    check_shared_flags(args)
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError("Do not pass `--hub_token` with `--report_to=wandb`: the token would be logged.")
