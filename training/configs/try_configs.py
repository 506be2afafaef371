#!/usr/bin/env python
"""Run every training script under every accelerate config for a few micro steps, with a checkpoint, a resume
and the export; record which combinations work and the peak memory of the largest process.

On a CPU machine (`--cpu`) the configs run on 2 processes with the gloo backend and the tiny ShapesWorld-size
components the tests use; on GPUs, pass `--teacher` (e.g. `benchmarks/make_random_sd15.py`'s folder) for the
scripts that start from a teacher. Writes a markdown table (and prints it).

    python training/configs/try_configs.py --cpu --out benchmarks/results/speed_training_configs_cpu.md
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["ddp", "fsdp", "deepspeed_zero2"]


def script_args(script: str, teacher: Path, pairs: Path, out: Path) -> list[str]:
    """Micro settings of each script (those of its tests), two steps with a checkpoint at step 1."""
    common = ["--output_dir", str(out), "--checkpointing_steps", "1", "--validation_steps", "1000"]
    micro = {
        "train_judge.py": ["--train_batch_size", "8", "--num_train_samples", "64", "--num_eval_samples", "16"],
        "train_teacher.py": ["--scale", "micro", "--num_train_samples", "64", "--train_batch_size", "4",
                             "--vae_train_steps", "2", "--num_validation_images", "2"],
        "train_tiny_decoder.py": ["--pretrained_model_name_or_path", str(teacher), "--dataset_name", "shapesworld",
                                  "--num_train_samples", "32", "--train_batch_size", "4", "--num_eval_samples", "8",
                                  "--decoder_block_out_channels", "8", "8", "--num_decoder_blocks", "1", "1"],
        "train_rectified_flow.py": ["--pretrained_model_name_or_path", str(teacher), "--pairs_dir", str(pairs),
                                    "--train_batch_size", "2", "--num_validation_images", "2"],
        "train_snoopi.py": ["--pretrained_model_name_or_path", str(teacher), "--train_batch_size", "2",
                            "--fake_lora_rank", "4", "--fake_lora_alpha", "4", "--shapesworld_prompts", "32",
                            "--num_validation_images", "2"],
        "train_oms.py": ["--pretrained_model_name_or_path", str(teacher), "--num_train_samples", "64",
                         "--train_batch_size", "4", "--num_validation_images", "2", "--block_out_channels", "4", "8",
                         "--norm_num_groups", "2", "--attention_head_dim", "2"],
    }  # fmt: skip
    return [*micro[script], *common]


def launch(config: str, script: str, args: list[str], cpu: bool, num_processes: int, log: Path) -> tuple[bool, float, str]:
    """One `accelerate launch`; returns (success, peak RSS of the largest process in MiB, last error line)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(REPO / "training" / "configs" / f"{config}.yaml"),
               "--num_processes", str(num_processes), "--mixed_precision", "no"]  # fmt: skip
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
        if config == "deepspeed_zero2":
            env["DS_ACCELERATOR"] = "cpu"
    command += [str(REPO / "training" / script), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    log.write_text(result.stdout + result.stderr)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    errors = [line for line in result.stderr.splitlines() if re.match(r"^\w*(Error|Exception)\b|^\w+Error:", line)]
    return result.returncode == 0, int(peak.group(1)) / 1024 if peak else float("nan"), (errors[-1] if errors else "")


def make_tiny_teacher(root: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tiny_sd_components
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **make_tiny_sd_components(root / "tokenizer-files"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(root / "teacher")
    return root / "teacher"


def make_pairs(teacher: Path, out: Path) -> Path:
    result = subprocess.run(
        [sys.executable, str(REPO / "training" / "generate_reflow_pairs.py"), "--pretrained_model_name_or_path",
         str(teacher), "--output_dir", str(out), "--num_pairs", "8", "--shard_size", "4", "--batch_size", "4",
         "--num_inference_steps", "2", "--guidance_scale", "4", "--shapesworld_prompts", "8"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"generate_reflow_pairs.py failed:\n{result.stderr[-3000:]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="Run on the CPU (gloo), with tiny components.")
    parser.add_argument("--teacher", type=Path, default=None, help="A teacher pipeline folder (default: a tiny one).")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument(
        "--scripts",
        nargs="+",
        default=["train_judge.py", "train_teacher.py", "train_tiny_decoder.py", "train_rectified_flow.py",
                 "train_snoopi.py", "train_oms.py"],
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="Markdown table to write.")
    parser.add_argument("--logs", type=Path, default=None, help="Folder for each run's log (default: beside --out).")
    args = parser.parse_args()
    logs = args.logs or args.out.with_suffix("")
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = args.teacher or make_tiny_teacher(tmp)
        pairs = make_pairs(teacher, tmp / "pairs") if "train_rectified_flow.py" in args.scripts else tmp
        for config in args.configs:
            for script in args.scripts:
                out = tmp / f"{config}-{script}"
                base = script_args(script, teacher, pairs, out)
                start = time.perf_counter()
                log = logs / f"{config}-{Path(script).stem}.log"
                first, peak, error = launch(config, script, [*base, "--max_train_steps", "1"], args.cpu,
                                            args.num_processes, log)  # fmt: skip
                resumed, peak2, error2 = (False, float("nan"), "")
                if first:
                    resumed, peak2, error2 = launch(
                        config, script, [*base, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"],
                        args.cpu, args.num_processes, log.with_name(log.stem + "-resume.log"),
                    )  # fmt: skip
                exported = resumed and (out / "README.md").is_file()  # the card is written last, after the export
                rows.append({
                    "config": config, "script": script, "step+checkpoint": first, "resume+export": exported,
                    "peak_mib": max(peak, peak2) if resumed else peak, "seconds": time.perf_counter() - start,
                    "error": error if not first else error2,
                })  # fmt: skip
                print(rows[-1], flush=True)
    lines = [
        "| config | script | step + checkpoint | resume + export | peak RSS, largest process (MiB) | s | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
        error = r["error"].replace("|", "\\|")[:160]
        lines.append(
            f"| {r['config']} | {r['script']} | {yes(r['step+checkpoint'])} | {yes(r['resume+export'])} |"
            f" {r['peak_mib']:.0f} | {r['seconds']:.0f} | {error} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
