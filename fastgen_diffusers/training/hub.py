"""Model cards from the package's templates (`fastgen_diffusers/model_cards/`) through huggingface_hub's `ModelCard`,
and uploads to the Hub."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client: its connection errors are no OSError
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder

from ..pipelines.auto import resolve_model_location

MODEL_CARDS_DIR = Path(__file__).resolve().parents[1] / "model_cards"
# huggingface_hub renders the metadata; the description is a filled template, inserted as it is.
CARD_LAYOUT = "---\n{{ card_data }}\n---\n\n{{ description }}\n"


# What an upload leaves behind: training state (checkpoints, interrupted writes, tracker logs), not the model.
# The step journal (step_log.jsonl) is training state too: it grows with every step and only resumes read it.
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "*.partial", "*.partial/*", "logs/*", ".ppap-staging-*", "step_log.jsonl"]
# Flags whose value must never reach a model card or an uploaded file.
SECRET_FLAGS = ("--hub_token",)


class HubUploadError(OSError):
    """The upload failed after the local output was written in full; `upload_command` re-runs the upload alone."""


def redact_secrets(argv: list[str]) -> list[str]:
    """`argv` with the value of every `SECRET_FLAGS` flag (`--flag VALUE` or `--flag=VALUE`) replaced by `***`."""
    redacted = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] in SECRET_FLAGS:
            arg = "***"
        elif arg.split("=", 1)[0] in SECRET_FLAGS and "=" in arg:
            arg = arg.split("=", 1)[0] + "=***"
        redacted.append(arg)
    return redacted


def training_command() -> str:
    """The command line that started this process, to be recorded in the model card (with no token in it)."""
    return shlex.join([Path(sys.argv[0]).as_posix(), *redact_secrets(sys.argv[1:])])


def upload_command(output_dir: str | Path, hub_model_id: str) -> str:
    """The command that uploads a finished output folder again, alone (this module's entry point)."""
    return shlex.join(
        ["python", "-m", "fastgen_diffusers.training.hub", str(output_dir), "--hub_model_id", hub_model_id]
    )


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


def files_holding(folder: Path, secret: str) -> list[Path]:
    """The small text files (json, txt, md, yaml) in `folder`, checkpoints aside, that contain `secret`."""
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if relative.startswith(("checkpoint-", "logs/")) or path.suffix not in {".json", ".txt", ".md", ".yaml"}:
            continue
        if path.is_file() and path.stat().st_size < 10_000_000 and secret in path.read_text(errors="ignore"):
            found.append(path)
    return found


def push_folder_to_hub(output_dir: str | Path, hub_model_id: str, token: str | None = None) -> str:
    """Create the repository if needed and upload the folder, leaving training state (`UPLOAD_IGNORE_PATTERNS`)
    behind. Any failure (network, refused token, Hub error) is a `HubUploadError` that names the folder and the
    command to upload it again; nothing local is touched."""
    output_dir = Path(output_dir)
    retry = f"The local output in {output_dir} is complete; upload it again with:\n    {upload_command(output_dir, hub_model_id)}"
    if token and (leaks := files_holding(output_dir, token)):
        raise HubUploadError(f"Not uploading {output_dir}: {[str(p) for p in leaks]} contain the Hub token. {retry}")
    try:
        repo_id = create_repo(repo_id=hub_model_id, exist_ok=True, token=token).repo_id
        upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            commit_message="End of training",
            ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),
            token=token,
        )
    # Hub answers, offline mode, connection errors, bad replies; a failed LFS transfer is a RuntimeError.
    except (OSError, ValueError, RuntimeError, httpx2.HTTPError) as error:
        raise HubUploadError(
            f"Uploading {output_dir} to the Hub as {hub_model_id!r} failed: {error}\n{retry}"
        ) from error
    return repo_id


def push_to_hub_or_exit(args: argparse.Namespace) -> None:
    """A script's last stage: upload `args.output_dir` as `--hub_model_id`; on failure, exit with status 1 and a
    message saying how to upload again, instead of a traceback from deep inside the HTTP client."""
    output_dir = Path(args.output_dir)
    try:
        push_folder_to_hub(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token)
    except HubUploadError as error:
        raise SystemExit(f"error: {error}") from None


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
        push_to_hub_or_exit(args)


def main(argv: list[str] | None = None) -> None:
    """Upload a finished output folder alone, e.g. after the upload at the end of training failed."""
    parser = argparse.ArgumentParser(prog="python -m fastgen_diffusers.training.hub", description=main.__doc__)
    parser.add_argument("output_dir", help="A training script's `--output_dir`, with its model and README.md.")
    parser.add_argument(
        "--hub_model_id", default=None, help="Repository id, e.g. `user/shapes-teacher` (default: the folder's name)."
    )
    parser.add_argument("--hub_token", default=None, help="Default: `HF_TOKEN` or the token of `hf auth login`.")
    args = parser.parse_args(argv)
    if not (Path(args.output_dir) / "README.md").is_file():
        parser.error(f"`output_dir` {args.output_dir!r} holds no README.md: not a finished training output.")
    push_to_hub_or_exit(args)
    print(f"Uploaded {args.output_dir} to {args.hub_model_id or Path(args.output_dir).name}")


if __name__ == "__main__":
    main()
