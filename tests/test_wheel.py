"""The package as a user installs it: a wheel built from the repository, in a fresh virtual environment.

Slow (it installs the CPU build of torch and the dependencies from the package index): `make test-slow`.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest


REPOSITORY = Path(__file__).resolve().parents[1]
TORCH_CPU = "torch==2.13.0"  # as in the Makefile: a plain `torch` requirement would pull a CUDA build

WRITE_A_CARD = """
import re, sys
from pathlib import Path
from fastgen_diffusers.training.hub import MODEL_CARDS_DIR, save_model_card
fields = set(re.findall(r"{([a-z_]+)}", (MODEL_CARDS_DIR / "shapes_judge.md").read_text()))
card = save_model_card(sys.argv[1], "shapes_judge", {name: "filled" for name in fields}, tags=["shapesworld"])
print(card.read_text())
"""


def run(*command: str | Path, cwd: Path) -> str:
    return subprocess.run([str(c) for c in command], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.mark.slow
def test_an_installed_wheel_writes_a_model_card_and_generates(tmp_path):
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", REPOSITORY, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("fastgen_diffusers-*.whl")
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", TORCH_CPU, cwd=tmp_path)
    run(python, "-m", "pip", "install", "-q", wheel, cwd=tmp_path)

    # Run outside the repository, so that nothing is imported from the checkout.
    (tmp_path / "card").mkdir()
    card = run(python, "-c", WRITE_A_CARD, tmp_path / "card", cwd=tmp_path)
    assert card.startswith("---\n") and "fastgen-diffusers" in card and "filled" in card
    printed = run(
        tmp_path / "venv" / "bin" / "fastgen",
        "generate",
        "--model",
        "shapes-instaflow",
        "--prompt",
        "a red circle",
        "--out",
        tmp_path / "images",
        cwd=tmp_path,
    )
    assert printed.startswith("Wrote 1 image to") and (tmp_path / "images" / "00000.png").is_file()
