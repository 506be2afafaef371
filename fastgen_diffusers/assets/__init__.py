"""Small trained ShapesWorld checkpoints shipped inside the package: the embedded defaults."""

from __future__ import annotations

from pathlib import Path


ASSETS_DIR = Path(__file__).resolve().parent


def names() -> list[str]:
    """Names of the embedded checkpoints, e.g. `shapes-teacher`."""
    return sorted(p.name for p in ASSETS_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def pipeline_names() -> list[str]:
    """The embedded text-to-image models (a pipeline folder with a UNet), the ones `fastgen generate` can run."""
    return [
        name
        for name in names()
        if (ASSETS_DIR / name / "model_index.json").is_file() and (ASSETS_DIR / name / "unet").is_dir()
    ]


def path(name: str) -> Path:
    """Local folder of the embedded checkpoint `name`."""
    folder = ASSETS_DIR / name
    if name not in names():
        raise ValueError(f"Unknown embedded model {name!r}; the embedded ones are {names()}.")
    return folder
