"""Model cards from `model_cards/` templates, and uploads to the Hub, through huggingface_hub and Diffusers."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder


MODEL_CARDS_DIR = Path(__file__).resolve().parents[1] / "model_cards"


def training_command() -> str:
    """The command line that started this process, to be recorded in the model card."""
    return shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def save_model_card(
    output_dir: str | Path,
    template: str,
    fields: dict[str, str],
    tags: list[str],
    base_model: str | None = None,
) -> Path:
    """Fill `model_cards/{template}.md` with `fields` and save it as `output_dir/README.md` with Hub metadata."""
    template_path = MODEL_CARDS_DIR / f"{template}.md"
    if not template_path.is_file():
        raise ValueError(f"`template` {template!r} has no file {template_path}.")
    description = template_path.read_text().format(**fields)
    metadata = ModelCardData(
        license="apache-2.0",
        library_name="diffusers",
        base_model=base_model,
        tags=["diffusers", "fastgen-diffusers", "diffusers-training", *tags],
    )
    path = Path(output_dir) / "README.md"
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{description}").save(str(path))
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
