"""Kill-and-resume harness for the long jobs: SIGKILL a job at random moments, resume it, compare with a run that
was never interrupted.

A job runs as a child process on the CPU, one thread, deterministic algorithms, fixed seeds. Children are forked
from a `multiprocessing` fork server that has imported torch, diffusers and the package once, so a start costs a
fraction of a second instead of the ~10 s an import takes on a busy machine; each child is still its own process,
killed with a real SIGKILL. A killed job is started again with the same command (every training command carries
`--resume_from_checkpoint latest`; pair generation skips complete shards). Kills happen

- `"random"`: once a random step (or shard) between the one the job resumed from and the last is done, after a
  random delay (0-0.1 s), so that some land mid-step, some in a checkpoint, some at the export;
- `"write"`: the moment a checkpoint, pair shard or generated shard exists as its temporary `*.partial`, that is
  while it is being written.

After each segment the harness checks what the job left: every complete checkpoint and the step journal (see
`run.record_step`) equal the uninterrupted run's for the same steps, and a `*.partial` checkpoint is never the one
`--resume_from_checkpoint latest` picks. At the end: every step 1..N once in the journal, the same per-sample
fingerprints (data order) and losses, the same weights and optimizer state within `TOLERANCE`, pair and generated
shards byte for byte.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import runpy
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import datasets  # noqa: F401  (imported once in the fork server, with diffusers, transformers and the package)
import diffusers  # noqa: F401
import fastgen_diffusers.training.run  # noqa: F401
from fastgen_diffusers.training.checkpointing import list_checkpoints, resolve_resume_path
from fastgen_diffusers.training.run import STEP_JOURNAL

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6
# The files of a checkpoint that hold training state; `*.pkl`/`*.bin` are accelerate's pickles (this test's own).
STATE_SUFFIXES = (".safetensors", ".bin", ".pkl")


@dataclass
class Job:
    """A training or generation command, and where it writes."""

    name: str
    script: str
    args: list[str]  # everything but `--output_dir` and `--resume_from_checkpoint`
    length: int  # optimisation steps (pair generation: shards)
    resumable: bool = True  # False: resumed by running the same command again (pair generation)
    side_dirs: tuple[str, ...] = ()  # folders beside the output folder it also writes (suffixes of its name)
    shard_globs: tuple[str, ...] = ()  # shards compared byte for byte, in the output folder or a side folder

    def command(self, out: Path) -> list[str]:
        resume = ["--resume_from_checkpoint", "latest"] if self.resumable else []
        return [*self.args, "--output_dir", str(out), *resume]

    def folders(self, out: Path) -> list[Path]:
        return [out, *(out.with_name(out.name + suffix) for suffix in self.side_dirs)]


@dataclass
class Report:
    """What happened to one job."""

    job: str
    kills: list[str] = field(default_factory=list)  # the kind of each kill that landed
    resumed_from: list[int] = field(default_factory=list)  # after each kill: the checkpoint step (pairs: shards)
    mid_write_kills: int = 0  # kills that left a `*.partial` write behind
    resumes: int = 0
    exact_resumes: int = 0  # resumes after which everything written matched the uninterrupted run
    final_exact: bool = False
    problems: list[str] = field(default_factory=list)

    def row(self) -> str:
        return (
            f"| {self.job} | {len(self.kills)} ({self.mid_write_kills} mid-write) | "
            f"{', '.join(map(str, self.resumed_from))} | {self.exact_resumes} of {self.resumes} | "
            f"{'yes' if self.final_exact else 'no'} |"
        )


# ----------------------------------------------------------------------------- running a job


def _child(script: str, argv: list[str], log_path: str, env: dict[str, str]) -> None:
    """The job, in a forked child: output to `log_path`, one thread, deterministic algorithms, then the script."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.update(env)
    datasets.config.HF_DATASETS_CACHE = Path(env["HF_DATASETS_CACHE"])  # read at import, which the server did
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    sys.argv = [script, *argv]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(script, run_name="__main__")


# What the fork server imports once (by name: Python 3.11's server does not see the tests folder).
PRELOAD = ["torch", "accelerate", "transformers", "peft", "datasets", "diffusers", "diffusers.training_utils",
           "fastgen_diffusers", "fastgen_diffusers.shapes", "fastgen_diffusers.guidance.ppap",
           *(f"fastgen_diffusers.training.{name}" for name in ("arguments", "checkpointing", "data", "hub", "lora",
             "prompts", "reflow", "run", "score_distillation", "snr_weighting", "students", "validation"))]  # fmt: skip
_context = None


def _fork_server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def job_env(cache_dir: Path) -> dict[str, str]:
    return {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "ACCELERATE_USE_CPU": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cache_dir),
    }


def run_job(
    job: Job, out: Path, kill_when: Callable[[], bool] | None = None, timeout: float = 900.0
) -> int | None:
    """Run `job` into `out` until it ends (its exit code) or `kill_when()` holds (then SIGKILL; None)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_name(out.name + ".log")
    env = job_env(out.with_name(out.name + "-datasets-cache"))
    with open(log, "a") as f:
        f.write(f"\n===== {job.script} {' '.join(job.command(out))}\n")
    process = _fork_server().Process(
        target=_child, args=(str(REPO / "training" / job.script), job.command(out), str(log), env), daemon=True
    )
    process.start()
    deadline = time.monotonic() + timeout
    while process.is_alive():
        if kill_when is not None and kill_when():
            os.kill(process.pid, signal.SIGKILL)
            process.join()
            return None
        if time.monotonic() > deadline:
            os.kill(process.pid, signal.SIGKILL)
            process.join()
            raise TimeoutError(f"{job.name} ran over {timeout} s; see {log}")
        time.sleep(0.0005)
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{job.name} exited with {process.exitcode}:\n{log.read_text()[-3000:]}")
    return process.exitcode


# ----------------------------------------------------------------------------- when to kill


def journal_steps(out: Path) -> list[int]:
    """The steps of the journal's complete lines."""
    path = out / STEP_JOURNAL
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            try:
                steps.append(json.loads(line)["step"])
            except json.JSONDecodeError:
                pass
    return steps


def progress(job: Job, out: Path) -> int:
    """How far the job is: journal lines, or complete shards for pair generation."""
    if job.resumable:
        return len(journal_steps(out))
    return len(shard_names(job, out))


def shard_names(job: Job, folder: Path) -> list[str]:
    return sorted({path.name for pattern in job.shard_globs for path in folder.glob(pattern)})


def writes_in_progress(job: Job, out: Path) -> dict[str, tuple[int, int]]:
    """The temporary `*.partial` checkpoints and shards of the job (not the journal's or the arguments' rewrite),
    each with its inode and time, which tell a write begun again from one a kill left behind."""
    found = {}
    for folder in job.folders(out):
        if folder.is_dir():
            for entry in os.scandir(folder):
                name = entry.name
                if name.endswith(".partial") and name.startswith(("checkpoint-", "shard-", "latents-", "labels-")):
                    try:
                        status = entry.stat()
                    except FileNotFoundError:  # renamed since the listing: the write just ended
                        continue
                    found[entry.path] = (status.st_ino, status.st_mtime_ns)
    return found


def resume_point(job: Job, out: Path) -> int:
    """What a restart would resume from: the latest complete checkpoint's step, or the number of complete shards."""
    if job.resumable:
        checkpoints = list_checkpoints(out)
        return int(checkpoints[-1].name.split("-")[1]) if checkpoints else 0
    return progress(job, out)


def kill_trigger(
    kind: str, job: Job, out: Path, rng: random.Random, ignore: dict[str, tuple[int, int]]
) -> Callable[[], bool]:
    """When to kill, always once there is something to resume from (a checkpoint, a shard), so that the restart
    is a resume: `"write"`, while a checkpoint or shard is being written (not one an earlier kill left behind, in
    `ignore`); `"random"`, a random delay (0-0.1 s) after a random step (or shard) before the last."""
    if kind == "write":
        return lambda: resume_point(job, out) > 0 and bool(set(writes_in_progress(job, out).items()) - set(ignore.items()))
    start = progress(job, out)
    target, delay = rng.randint(start + 1, max(start + 1, job.length - 1)), rng.uniform(0.0, 0.1)
    reached_at = []

    def due() -> bool:
        if not reached_at and progress(job, out) >= target and resume_point(job, out) > 0:
            reached_at.append(time.monotonic())
        return bool(reached_at) and time.monotonic() - reached_at[0] >= delay

    return due


# ----------------------------------------------------------------------------- comparing with the reference


def close(a, b, path: str) -> list[str]:
    """Differences between two loaded states (nested dicts, lists, tensors, arrays, numbers), beyond TOLERANCE."""
    if isinstance(a, torch.Tensor) or isinstance(a, np.ndarray):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{path}: shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"]
        if a.is_floating_point():
            diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
            return [] if diff <= TOLERANCE else [f"{path}: max difference {diff:.3g}"]
        return [] if torch.equal(a, b) else [f"{path}: differs"]
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        return [d for key in a for d in close(a[key], b[key], f"{path}.{key}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        ok = math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE) or (math.isnan(a) and math.isnan(b))
        return [] if ok else [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def load_state_file(path: Path):
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=False)  # accelerate's pickles, written by this test


def compare_folder(reference: Path, candidate: Path) -> list[str]:
    """Every state file of `reference` (recursively, checkpoints excluded) against the same file in `candidate`."""
    problems = []
    for ref in sorted(reference.rglob("*")):
        relative = ref.relative_to(reference)
        if not ref.is_file() or ref.suffix not in STATE_SUFFIXES or relative.parts[0].startswith("checkpoint-"):
            continue
        other = candidate / relative
        if not other.is_file():
            problems.append(f"{candidate.name}/{relative}: missing")
            continue
        problems += close(load_state_file(ref), load_state_file(other), f"{candidate.name}/{relative}")
    return problems


def compare_checkpoints(reference: Path, out: Path, checked: set[str]) -> list[str]:
    """The complete checkpoints in `out` not checked yet, against the reference's."""
    problems = []
    for checkpoint in list_checkpoints(out):
        if checkpoint.name in checked:
            continue
        checked.add(checkpoint.name)
        if not (reference / checkpoint.name).is_dir():
            problems.append(f"{checkpoint.name}: not in the uninterrupted run")
            continue
        problems += compare_folder(reference / checkpoint.name, checkpoint)
    return problems


def read_journal(out: Path) -> list[dict]:
    path = out / STEP_JOURNAL
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def compare_journal(reference: list[dict], out: Path, complete: bool) -> list[str]:
    """The journal's lines against the reference's for the same steps; `complete`: also every step once."""
    lines = read_journal(out)
    steps = [line["step"] for line in lines]
    problems = []
    if steps != sorted(set(steps)):
        problems.append(f"journal steps repeated or out of order: {steps}")
    if complete and steps != [line["step"] for line in reference]:
        problems.append(f"journal steps {steps}, uninterrupted {[line['step'] for line in reference]}")
    by_step = {line["step"]: line for line in reference}
    for line in lines:
        if line["step"] not in by_step:
            problems.append(f"journal step {line['step']} is not in the uninterrupted run")
        else:
            problems += close(by_step[line["step"]], line, f"journal step {line['step']}")
    return problems


def compare_shards(job: Job, reference: Path, out: Path, complete: bool) -> list[str]:
    """The shards written so far (`complete`: all of them) byte for byte against the reference's."""
    problems = []
    for ref_folder, folder in zip(job.folders(reference), job.folders(out)):
        ref_shards, shards = shard_names(job, ref_folder), shard_names(job, folder)
        if (ref_shards != shards) if complete else not set(shards) <= set(ref_shards):
            problems.append(f"{folder.name}: shards {shards}, uninterrupted {ref_shards}")
        problems += [
            f"{folder.name}/{name}: not byte-identical"
            for name in set(ref_shards) & set(shards)
            if (ref_folder / name).read_bytes() != (folder / name).read_bytes()
        ]
    return problems


def check_latest_is_whole(job: Job, out: Path) -> list[str]:
    """`--resume_from_checkpoint latest` never picks a half-written checkpoint."""
    latest = resolve_resume_path(out, "latest") if job.resumable and out.is_dir() else None
    if latest is not None and (latest.name.endswith(".partial") or not latest.is_dir()):
        return [f"latest is {latest.name}"]
    return []


# ----------------------------------------------------------------------------- the harness


def kill_and_resume(job: Job, reference: Path, out: Path, kinds: list[str], seed: int = 0) -> Report:
    """Run `job` into `out`, killed once per entry of `kinds` ("random" or "write"), resumed each time, then to the
    end; compare everything with `reference`, the same job run once without interruption."""
    rng = random.Random(f"{job.name}-{seed}")
    report = Report(job.name)
    reference_journal = read_journal(reference)
    checked: set[str] = set()
    for kind in [*kinds, None]:
        resumed = bool(report.kills)  # every segment after the first follows a kill
        before = writes_in_progress(job, out)
        trigger = kill_trigger(kind, job, out, rng, ignore=before) if kind is not None else None
        exit_code = run_job(job, out, trigger)
        if exit_code is None:
            report.kills.append(kind)
            report.mid_write_kills += bool(set(writes_in_progress(job, out).items()) - set(before.items()))
            report.resumed_from.append(resume_point(job, out))
        problems = check_latest_is_whole(job, out)
        if job.resumable:
            problems += compare_checkpoints(reference, out, checked)
            problems += compare_journal(reference_journal, out, complete=exit_code is not None)
        else:
            problems += compare_shards(job, reference, out, complete=exit_code is not None)
        if resumed:
            report.resumes += 1
            report.exact_resumes += not problems
        report.problems += problems
        if exit_code is not None:
            break
    report.problems += compare_folder(reference, out)
    if job.shard_globs and job.resumable:
        report.problems += compare_shards(job, reference, out, complete=True)
    leftovers = [p.name for p in writes_in_progress(job, out)]
    if leftovers:
        report.problems.append(f"temporary writes left behind: {leftovers}")
    report.final_exact = not report.problems
    return report
