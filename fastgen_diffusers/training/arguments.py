"""Command-line flags every fastgen training script shares, named as in Diffusers' training examples."""

from __future__ import annotations

import argparse

from ..pipelines.negative_attention import METHOD_DEFAULTS


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
    """Reject a flag among `names` that is not above zero, naming it (None means unset and passes)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"`--{name}` must be positive, got {value}.")


def check_non_negative(args: argparse.Namespace, *names: str) -> None:
    """Reject a flag among `names` below zero, naming it."""
    for name in names:
        if getattr(args, name) < 0:
            raise ValueError(f"`--{name}` must be >= 0, got {getattr(args, name)}.")


def check_fraction(args: argparse.Namespace, *names: str) -> None:
    """Reject a flag among `names` outside [0, 1], naming it."""
    for name in names:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"`--{name}` must lie in [0, 1], got {getattr(args, name)}.")


def check_common_training_args(args: argparse.Namespace) -> None:
    """Reject values no run could use, naming the flag."""
    check_positive(args, "max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit <= 0:
        raise ValueError(f"`--checkpoints_total_limit` must be positive, got {args.checkpoints_total_limit}.")
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError("Do not pass `--hub_token` with `--report_to=wandb`: the token would be logged.")
