"""Model cards from the package's templates (`fastgen_diffusers/model_cards/`) through huggingface_hub's `ModelCard`,
and uploads to the Hub."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder

from ..pipelines.auto import resolve_model_location

MODEL_CARDS_DIR = Path(__file__).resolve().parents[1] / "model_cards"
# huggingface_hub renders the metadata; the description is a filled template, inserted as it is.
CARD_LAYOUT = "---\n{{ card_data }}\n---\n\n{{ description }}\n"


def training_command() -> str:
    """The command line that started this process, to be recorded in the model card."""
    return shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def hub_base_model(name_or_path: str) -> str | None:
    """`name_or_path` if it is a Hub id, for the card's `base_model` metadata; None for a local folder or an
    embedded model."""
    if Path(resolve_model_location(name_or_path)).exists() or name_or_path.count("/") != 1:
        return None
    return name_or_path


def save_model_card(
    output_dir: str | Path,
    template: str,
    fields: dict[str, str],
    tags: list[str],
    base_model: str | None = None,
) -> Path:
    """Fill `model_cards/{template}.md` with `fields` (`str.format` names) and save it as `output_dir/README.md`, with
    the Hub metadata in front."""
    template_path = MODEL_CARDS_DIR / f"{template}.md"
    if not template_path.is_file():
        raise ValueError(f"`template` {template!r} has no file {template_path}.")
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="diffusers",
        base_model=base_model,
        tags=["diffusers", "fastgen-diffusers", "diffusers-training", *tags],
    )
    description = template_path.read_text().format(**fields)
    card = ModelCard.from_template(card_data, template_str=CARD_LAYOUT, description=description)
    path = Path(output_dir) / "README.md"
    card.save(str(path))
    return path


def push_folder_to_hub(output_dir: str | Path, hub_model_id: str, token: str | None = None) -> str:
    """Create the repository if needed and upload the folder, leaving training checkpoints behind."""
    repo_id = create_repo(repo_id=hub_model_id, exist_ok=True, token=token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message="End of training",
        ignore_patterns=["checkpoint-*", "*.partial", "logs/*"],
        token=token,
    )
    return repo_id


def publish(
    args: argparse.Namespace, template: str, fields: dict[str, str], tags: list[str], base_model: str | None = None
) -> None:
    """The end of every script: the model card, with every command that made the run (`training_commands.txt`), and
    the upload when `--push_to_hub` asks for it."""
    output_dir = Path(args.output_dir)
    command = (output_dir / "training_commands.txt").read_text().strip()
    base_model = hub_base_model(base_model) if base_model is not None else None
    save_model_card(output_dir, template, {**fields, "command": command}, tags, base_model)
    if args.push_to_hub:
        push_folder_to_hub(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token)
