"""`--push_to_hub` end to end against a local fake Hub (tests/fake_hub.py): the real huggingface_hub client code runs
over HTTP. What arrives, what is left behind, the card's metadata, and what happens when the upload fails."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_hub import FakeHub

from fastgen_diffusers.training.hub import HubUploadError, push_folder_to_hub, redact_secrets, save_model_card
from fastgen_diffusers.training.hub import main as hub_main

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_fake_token_for_tests"
UPLOADED = {"README.md", "config.json", "diffusion_pytorch_model.safetensors", "training_args.json",
            "training_commands.txt"}  # fmt: skip


def hub_env(endpoint: str, token: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a process that talks to `endpoint` with `token` (Hub online, no Xet, no stored login)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1",
            "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip


def upload_again(output_dir: Path, hub_model_id: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The documented upload-only command."""
    command = [sys.executable, "-m", "fastgen_diffusers.training.hub", str(output_dir), "--hub_model_id", hub_model_id]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and its sha256, to show that nothing local changed."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def card_metadata(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def add_training_leftovers(output_dir: Path) -> None:
    """What a run leaves beside its model that must stay local: checkpoints (whole and interrupted), tracker logs,
    the step journal, interrupted atomic writes."""
    for relative in ("checkpoint-9/model.safetensors", "checkpoint-10.partial/optimizer.bin", "step_log.jsonl",
                     "logs/train/events.out.tfevents.1", "fastgen.json.partial", "pairs/shard-00001.parquet.partial"):  # fmt: skip
        (output_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (output_dir / relative).write_bytes(b"training state " + relative.encode())


@pytest.fixture
def output_folder(tmp_path) -> Path:
    """A finished output folder made by hand: a model, its card, the run's records and its leftovers."""
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "shapes-judge"
    out.mkdir()
    save_file({"weight": torch.arange(2048, dtype=torch.float32)}, str(out / "diffusion_pytorch_model.safetensors"))
    (out / "config.json").write_text('{"_class_name": "ShapesJudgeNet"}')
    (out / "training_args.json").write_text('{"hub_token": null}')
    (out / "training_commands.txt").write_text("training/train_judge.py --output_dir shapes-judge\n")
    save_model_card(out, "shapes_judge", {"n": "20", "accuracy_table": "| size | 1.0 |",
                                          "command": "training/train_judge.py"}, ["image-classification", "shapesworld"])  # fmt: skip
    add_training_leftovers(out)
    return out


def test_upload_sends_the_model_and_leaves_training_state(output_folder, tmp_path):
    before = snapshot(output_folder)
    with FakeHub(TOKEN) as hub:
        env = hub_env(hub.endpoint, TOKEN, tmp_path)
        result = upload_again(output_folder, "user/shapes-judge", env)
        assert result.returncode == 0, result.stderr[-3000:]
        files = hub.repos["user/shapes-judge"]
        assert set(files) == UPLOADED  # no checkpoint-*, *.partial or logs/
        assert all(files[name] == (output_folder / name).read_bytes() for name in UPLOADED)
        assert any(r.startswith("PUT /lfs/") for r in hub.requests)  # the weights went through LFS
        assert not hub.unexpected, hub.unexpected

        # Uploading again into the now existing repository (409 from create) works too.
        (output_folder / "accuracy.json").write_text('{"size": 1.0}')
        result = upload_again(output_folder, "user/shapes-judge", env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert set(hub.repos["user/shapes-judge"]) == UPLOADED | {"accuracy.json"}
    assert snapshot(output_folder).items() >= before.items()  # nothing local changed or went missing

    metadata = card_metadata(files["README.md"].decode())
    assert metadata["library_name"] == "diffusers" and metadata["license"] == "apache-2.0"
    assert metadata["tags"] == ["diffusers", "fastgen-diffusers", "diffusers-training", "image-classification",
                                "shapesworld"]  # fmt: skip


def test_server_down_exits_with_the_command_to_upload_again(output_folder, tmp_path):
    with FakeHub(TOKEN) as hub:
        endpoint = hub.endpoint  # a port nobody listens on once the block ends
    before = snapshot(output_folder)
    result = upload_again(output_folder, "user/shapes-judge", hub_env(endpoint, TOKEN, tmp_path))
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()
    assert message[0].startswith(f"error: Uploading {output_folder} to the Hub as 'user/shapes-judge' failed")
    assert "Traceback" not in result.stderr
    assert f"python -m fastgen_diffusers.training.hub {output_folder} --hub_model_id user/shapes-judge" in message[-1]
    assert snapshot(output_folder) == before


def test_upload_command_rejects_a_folder_without_a_card(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        hub_main([str(tmp_path), "--hub_model_id", "user/x"])
    assert exit_info.value.code == 2 and "holds no README.md" in capsys.readouterr().err


def test_the_token_is_never_recorded_or_uploaded(output_folder):
    assert redact_secrets(["--hub_token", TOKEN, "--seed", "1", f"--hub_token={TOKEN}"]) == [
        "--hub_token", "***", "--seed", "1", "--hub_token=***"]  # fmt: skip
    (output_folder / "training_args.json").write_text(f'{{"hub_token": "{TOKEN}"}}')
    with pytest.raises(HubUploadError, match="training_args.json.*contain the Hub token"):
        push_folder_to_hub(output_folder, "user/shapes-judge", token=TOKEN)  # refused before any request


def test_train_judge_push_refused_then_uploaded_alone(tmp_path):
    """A real script run whose upload is refused (401: a wrong token) ends with status 1 and a clear message after
    writing everything; the upload-only command then publishes the same folder."""
    out = tmp_path / "judge"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--cpu", "--num_processes", "1", str(REPO / "training" / "train_judge.py"),
              "--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "8",
              "--num_train_samples", "64", "--num_eval_samples", "20", "--checkpointing_steps", "1",
              "--push_to_hub", "--hub_model_id", "user/shapes-judge"]  # fmt: skip
    with FakeHub(TOKEN) as hub:
        result = subprocess.run(launch, env=hub_env(hub.endpoint, "hf_expired", tmp_path), capture_output=True,
                                text=True, timeout=600, cwd=REPO, check=False)  # fmt: skip
        assert result.returncode != 0
        assert "error: Uploading" in result.stderr and "401" in result.stderr
        assert f"python -m fastgen_diffusers.training.hub {out} --hub_model_id user/shapes-judge" in result.stderr
        assert hub.repos == {}
        assert UPLOADED | {"accuracy.json", "checkpoint-2/model.safetensors"} <= set(snapshot(out))

        add_training_leftovers(out)
        local = snapshot(out)
        result = upload_again(out, "user/shapes-judge", hub_env(hub.endpoint, TOKEN, tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        files = hub.repos["user/shapes-judge"]
        assert not hub.unexpected, hub.unexpected
    assert set(files) == UPLOADED | {"accuracy.json"}
    assert all(files[name] == (out / name).read_bytes() for name in files)
    assert snapshot(out) == local  # the upload changed nothing local
    metadata = card_metadata(files["README.md"].decode())
    assert {"diffusers", "fastgen-diffusers", "image-classification", "shapesworld"} <= set(metadata["tags"])
    assert "--push_to_hub --hub_model_id user/shapes-judge" in files["README.md"].decode()  # the command, recorded
