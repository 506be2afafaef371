"""Weights load from safetensors (pair shards from parquet) only, and a damaged file is named in the error.

A pickle (`.bin`, `.pt`, `.ckpt`, `.pkl`) runs whatever code it holds when it is loaded, so reading one needs an
explicit opt-in: `FastPipeline.from_pretrained(..., allow_pickle=True)` (or Diffusers' own `use_safetensors=False`). A truncated or corrupted file otherwise fails deep inside
safetensors, pyarrow or torch with a message that does not say which of a folder's files is bad (transformers, peft,
datasets, accelerate); `check_weight_files` reads each file's header first (no tensor data) and raises a `ValueError`
naming the file. Damage inside the tensor data of a safetensors file is not detectable: the format has no checksum.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
from safetensors import safe_open

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
PICKLE_RISK = "a pickle file: loading one runs any code it holds"
# Training state beside a finished model, checked when resuming (`check_weight_files(checkpoint, allow_pickle=True)`).
NOT_MODEL_FILES = ("checkpoint-", "logs")


def damaged(path: Path, error: Exception | str) -> ValueError:
    return ValueError(f"{path} is truncated or corrupted, or not the file its name says ({error}).")


def check_safetensors(path: Path) -> None:
    """Parse the header; safetensors also checks that it covers the file's size exactly (a cut file fails)."""
    try:
        with safe_open(str(path), framework="pt") as weights:
            weights.keys()
    except Exception as error:  # SafetensorError and OSError, whichever the damage gives
        raise damaged(path, error) from error


def check_parquet(path: Path) -> None:
    """The magic bytes at both ends and the footer's metadata."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
        if head != b"PAR1":
            raise ValueError(f"starts with {head!r}, not the parquet magic b'PAR1'")
        pq.read_metadata(path)
    except Exception as error:  # ArrowInvalid, OSError
        raise damaged(path, error) from error


def check_torch_archive(path: Path) -> None:
    """A `torch.save` file (a zip archive): its directory and every member's CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
        if bad_member is not None:
            raise ValueError(f"member {bad_member!r} fails its CRC")
    except Exception as error:  # BadZipFile, OSError, zlib errors
        raise damaged(path, error) from error


def check_weight_files(location: str | os.PathLike, allow_pickle: bool = False) -> None:
    """Check every weights file of a local file or folder (a Hub id is left to the Hub client): a safetensors or parquet
    file must be whole, and a pickle refuses to load unless `allow_pickle` (then it must be a whole torch archive).

    In a folder, checkpoints and logs beside the model are not looked at. Raises `ValueError` naming the file.
    """
    location = Path(location)
    if location.is_file():
        files = [location]
    elif location.is_dir():
        files = [
            path
            for path in sorted(location.rglob("*"))
            if path.is_file()
            and not any(part.startswith(NOT_MODEL_FILES) for part in path.relative_to(location).parts)
        ]
    else:
        return
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors(path)
        elif path.suffix == ".parquet":
            check_parquet(path)
        elif path.suffix in PICKLE_SUFFIXES:
            if allow_pickle:
                check_torch_archive(path)
            elif not any(path.parent.glob("*.safetensors")):  # with a safetensors copy beside it, that one loads
                raise ValueError(
                    f"{path} is {PICKLE_RISK}. Only safetensors load by default: convert it, or pass "
                    "`allow_pickle=True` if you trust where it came from."
                )
