import json

import numpy as np
import pytest
from PIL import Image

from fastgen_diffusers import RectifiedFlowEulerScheduler, assets
from fastgen_diffusers.cli import main


def test_generate_writes_images_and_index(tiny_sd_path, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na large blue square on a white background\n")
    out = tmp_path / "out"
    main(["generate", "--model", str(tiny_sd_path), "--prompts", str(prompts), "--steps", "2", "--num-images", "2",
          "--seed", "3", "--batch-size", "3", "--out", str(out)])  # fmt: skip
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
    records = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["a large blue square on a white background"] * 2
    assert [r["file"] for r in records] == [f"{i:05d}.png" for i in range(4)]
    assert all(r["seed"] == 3 and r["num_inference_steps"] == 2 for r in records)
    assert str(out) in capsys.readouterr().out


def test_generate_image_does_not_depend_on_batch_size(tiny_sd_path, tmp_path):
    images = {}
    for batch_size in (1, 4):
        out = tmp_path / f"b{batch_size}"
        main(["generate", "--model", str(tiny_sd_path), "--prompt", "a red circle", "--num-images", "4",
              "--steps", "2", "--batch-size", str(batch_size), "--out", str(out)])  # fmt: skip
        images[batch_size] = [np.asarray(Image.open(out / f"{i:05d}.png"), dtype=np.int16) for i in range(4)]
    for a, b in zip(images[1], images[4]):
        assert np.abs(a - b).max() <= 1
    assert np.abs(images[1][0] - images[1][1]).max() > 0  # different images draw different noise


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "no-such-model", "--prompt", "x", "--out", "o"], "embedded"),
        (["generate", "--model", "M", "--prompts", "missing.txt", "--out", "o"], "--prompts"),
        (["generate", "--model", "M", "--prompt", "x", "--steps", "-2", "--out", "o"], "--steps"),
        (["generate", "--model", "M", "--prompt", "x", "--out", "FILE"], "--out"),
        (["eval", "--model", "M", "--n", "0"], "--n"),
        (["eval", "--model", "M", "--steps", "2", "--sigmas", "1", "0.5"], "--sigmas"),
        (["generate", "--model", "M", "--prompt", "x", "--sigmas", "1", "0.5", "--out", "o"], "--sigmas"),  # DDIM
        (["generate", "--model", "shapes-2rf", "--prompt", "x", "--sigmas", "0.5", "1", "--out", "o"], "--sigmas"),
    ],
)
def test_bad_input_names_the_argument(argv, message, tiny_sd_path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("")
    argv = [str(tiny_sd_path) if a == "M" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error
    if message == "embedded":
        assert all(name in error for name in assets.pipeline_names())
        assert "shapes-judge" not in error  # not a model to generate with


def test_eval_prints_json_with_every_metric(capsys):
    main(["eval", "--model", "shapes-teacher", "--n", "8", "--steps", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 8 and result["num_inference_steps"] == 2
    assert set(result["adherence"]) == {"all", "shape", "colour", "size", "position", "background"}
    for key in ("shapes_fd", "brightness_error", "images_per_second"):
        assert np.isfinite(result[key])
    assert all(0.0 <= v <= 1.0 for v in result["adherence"].values())


def test_sigmas_set_the_sampling_grid(tmp_path):
    """`--sigmas` with the noise levels of the model's own 2-step grid gives the same images as `--steps 2`."""
    scheduler = RectifiedFlowEulerScheduler.from_pretrained(assets.path("shapes-2rf"), subfolder="scheduler")
    scheduler.set_timesteps(2)
    own_grid = [f"{sigma:.6f}" for sigma in scheduler.sigmas[:-1].tolist()]
    images = {}
    for name, grid in {"steps": ["--steps", "2"], "sigmas": ["--sigmas", *own_grid]}.items():
        out = tmp_path / name
        main(["generate", "--model", "shapes-2rf", "--prompt", "a red circle", "--num-images", "2", *grid,
              "--out", str(out)])  # fmt: skip
        images[name] = [np.asarray(Image.open(out / f"{i:05d}.png"), dtype=np.int16) for i in range(2)]
    for a, b in zip(images["steps"], images["sigmas"]):
        assert np.abs(a - b).max() <= 1
    out = tmp_path / "front-loaded"
    main(["generate", "--model", "shapes-2rf", "--prompt", "a red circle", "--num-images", "2",
          "--sigmas", "1", "0.3", "--out", str(out)])  # fmt: skip
    other = [np.asarray(Image.open(out / f"{i:05d}.png"), dtype=np.int16) for i in range(2)]
    assert max(np.abs(a - b).max() for a, b in zip(images["steps"], other)) > 1  # another grid, other images
