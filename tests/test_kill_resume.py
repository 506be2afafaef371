"""Kill and resume, for every long job: SIGKILLed, resumed with `--resume_from_checkpoint latest` (pair generation:
the same command), the result equals an uninterrupted run's (see `kill_resume.py`).

Default suite: each job killed once, while it writes a checkpoint or shard. The full harness (three kills a job, at
random moments and mid-write) is `slow`:

    .venv/bin/python -m pytest -m slow tests/test_kill_resume.py -s
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from kill_resume import Job, Report, kill_and_resume, run_job

from fastgen_diffusers.training import run

# Pair generation first, and the PPAP guide: the reflow and expert jobs read their output.
JOB_NAMES = ["pairs", "teacher", "reflow", "distill", "snoopi", "oms", "ppap_guides", "ppap_experts",
             "tiny_decoder", "judge"]  # fmt: skip


def make_jobs(tiny_sd: Path, pairs_dir: Path, guide_dir: Path, steps: int) -> dict[str, Job]:
    """Each job on micro settings: `steps` optimisation steps, a checkpoint every 2, all kept (to compare each)."""
    common = ["--max_train_steps", str(steps), "--checkpointing_steps", "2", "--checkpoints_total_limit", "100",
              "--validation_steps", "100"]  # fmt: skip
    teacher = ["--pretrained_model_name_or_path", str(tiny_sd)]
    reflow = [*teacher, "--pairs_dir", str(pairs_dir), "--train_batch_size", "2", "--num_validation_images", "2",
              *common]  # fmt: skip
    return {
        "pairs": Job(
            "pairs", "generate_reflow_pairs.py", length=6, resumable=False, shard_globs=("shard-*.parquet",),
            args=[*teacher, "--num_pairs", "12", "--shard_size", "2", "--batch_size", "2", "--num_inference_steps",
                  "2", "--guidance_scale", "2.0", "--shapesworld_prompts", "12"],
        ),
        # The VAE stage (2 steps), then the UNet stage: `steps` in all.
        "teacher": Job(
            "teacher", "train_teacher.py", length=steps,
            args=["--scale", "micro", "--num_train_samples", "64", "--train_batch_size", "4", "--vae_train_steps",
                  "2", "--num_validation_images", "2", *common[:1], str(steps - 2), *common[2:]],
        ),
        "reflow": Job("reflow", "train_rectified_flow.py", length=steps, args=reflow),
        "distill": Job(
            "distill", "train_rectified_flow.py", length=steps, args=[*reflow, "--distill", "--loss", "pseudo_huber"]
        ),
        "snoopi": Job(
            "snoopi", "train_snoopi.py", length=steps,
            args=[*teacher, "--shapesworld_prompts", "32", "--train_batch_size", "2", "--fake_lora_rank", "4",
                  "--fake_lora_alpha", "4", "--learning_rate", "1e-3", "--ema_decay", "0.9",
                  "--num_validation_images", "2", "--nasa_training_prob", "0.5", "--shapesworld_negative_colours",
                  *common],
        ),
        "oms": Job(
            "oms", "train_oms.py", length=steps,
            args=[*teacher, "--num_train_samples", "64", "--train_batch_size", "4", "--num_validation_images", "2",
                  "--block_out_channels", "4", "8", "--norm_num_groups", "2", "--attention_head_dim", "2",
                  "--ema_decay", "0.5", "--caption_dropout_prob", "0.5", *common],
        ),
        "ppap_guides": Job(
            "ppap_guides", "train_ppap_guides.py", length=steps,
            args=["--task", "classification", "--train_batch_size", "4", "--num_train_samples", "16",
                  "--num_eval_samples", "8", *common],
        ),
        # Staged: generation (3 shards), the guide's labels, then 2 experts of steps / 2 each; 4 batches an epoch,
        # so that a resume at an even step is mid-epoch.
        "ppap_experts": Job(
            "ppap_experts", "train_ppap_experts.py", length=steps,
            side_dirs=("-generated",), shard_globs=("latents-*.safetensors", "labels-*.safetensors"),
            args=[*teacher, "--guide_path", str(guide_dir), "--num_inference_steps", "2", "--shapesworld_prompts",
                  "8", "--num_experts", "2", "--num_generated", "12", "--num_validation_generated", "4",
                  "--shard_size", "4", "--generation_batch_size", "4", "--train_batch_size", "2", *common],
        ),
        "tiny_decoder": Job(
            "tiny_decoder", "train_tiny_decoder.py", length=steps,
            args=[*teacher, "--dataset_name", "shapesworld", "--num_train_samples", "32", "--train_batch_size", "4",
                  "--decoder_block_out_channels", "8", "8", "--num_decoder_blocks", "1", "1", "--num_eval_samples",
                  "8", *common],
        ),
        "judge": Job(
            "judge", "train_judge.py", length=steps,
            args=["--train_batch_size", "8", "--num_train_samples", "64", "--num_eval_samples", "20", *common],
        ),
    }  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tiny_sd_path, tmp_path_factory) -> dict[str, Path]:
    """What two jobs read: reflow pairs from the tiny teacher, and a PPAP guide."""
    root = tmp_path_factory.mktemp("kill-resume-inputs")
    jobs = make_jobs(tiny_sd_path, root / "pairs", root / "guide", steps=2)
    run_job(jobs["pairs"], root / "pairs")
    run_job(jobs["ppap_guides"], root / "guide")
    return {"tiny_sd": tiny_sd_path, "pairs_dir": root / "pairs", "guide_dir": root / "guide"}


def check(report: Report) -> None:
    assert not report.problems, "\n".join(report.problems)
    assert report.final_exact and report.exact_resumes == report.resumes == len(report.kills)


def test_step_journal_keeps_the_steps_up_to_the_resumed_one(tmp_path):
    """Steps after the checkpoint a run resumes from are dropped (they are done again), and so is a torn line."""
    process = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    for step in (1, 2, 3):
        run.record_step(process, tmp_path, step, {"loss": 0.5 / step}, [run.fingerprints(torch.ones(2, 3) * step)])
    with open(tmp_path / run.STEP_JOURNAL, "a") as journal:
        journal.write('{"step": 4, "loss": 0.1')  # killed mid-line
    run.trim_step_journal(process, tmp_path, 2)
    lines = [json.loads(line) for line in (tmp_path / run.STEP_JOURNAL).read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5, "samples": [3.0, 3.0]}, {"step": 2, "loss": 0.25, "samples": [6.0, 6.0]}]
    same, again, other = run.text_fingerprints(["a red circle", "a red circle", "a blue square"]).tolist()
    assert same == again != other
    run.trim_step_journal(process, tmp_path, 0)  # a fresh start in the same folder
    assert (tmp_path / run.STEP_JOURNAL).read_text() == ""


@pytest.mark.parametrize("name", [name for name in JOB_NAMES if name != "distill"])  # distill: reflow's script
def test_killed_mid_write_resumes_exactly(name, inputs, tmp_path):
    job = make_jobs(**inputs, steps=4)[name]
    run_job(job, tmp_path / "reference")
    report = kill_and_resume(job, tmp_path / "reference", tmp_path / "run", ["write"])
    check(report)
    assert report.kills == ["write"] and report.mid_write_kills == 1


@pytest.mark.slow
def test_every_job_killed_three_times_resumes_exactly(inputs, tmp_path):
    """Three kills a job (mid-write, random, random), all jobs; the table goes to `$KILL_RESUME_TABLE` if set."""
    jobs = make_jobs(**inputs, steps=12)
    reports = []
    for name in JOB_NAMES:
        run_job(jobs[name], tmp_path / name / "reference")
        reports.append(kill_and_resume(jobs[name], tmp_path / name / "reference", tmp_path / name / "run",
                                       ["write", "random", "random"]))  # fmt: skip
    table = "\n".join(
        ["| job | kills (mid-write) | resumed from step (pairs: shard) | exact resumes | final state equal |",
         "|---|---|---|---|---|"]
        + [report.row() for report in reports]
    )
    print(table)
    if os.environ.get("KILL_RESUME_TABLE"):
        Path(os.environ["KILL_RESUME_TABLE"]).write_text(table + "\n")
    for report in reports:
        assert len(report.kills) >= 3 and report.mid_write_kills >= 1, report
        check(report)
