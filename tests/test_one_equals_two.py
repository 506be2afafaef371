"""One process equals two: every training script under `accelerate launch --multi_gpu --num_processes 2` on the CPU
(per-process batch B) against one process with batch 2B, the same global batch.

What must hold for every script:
  - the same samples each step: the union of the two processes' batches is the one process's batch (read from
    the step journal, `step_log.jsonl`, which gathers each step's sample fingerprints over the processes);
  - the same learning rate (a prepared scheduler steps once per process: `run.constant_lr_scheduler` scales its
    counts by the number of processes) and the same number of EMA updates (one per optimizer step);
  - each process its own random stream: the processes' RNG states in the last checkpoint differ (the same seed on
    every process would give every rank the same noise, timesteps and scales, a smaller effective batch).
Where the script's only randomness can be switched off (pixel noise at `--noise_std 0`, a one-step student at a fixed
time, a VAE whose posterior is all but deterministic), the weights after N steps are also compared: DDP averages
the processes' gradients, and the mean of two per-process means of B is the mean over 2B, so the two runs differ by
float summation order only (bounded at 1e-3 of the training update, see `assert_same_weights`). Where per-rank noise
cannot be switched off, the test's docstring says why.

The launches are slow (10-20 s each on two cores): the default run compares the judge (with gradient accumulation);
the other scripts are behind `-m slow` (see docs/reliability.md, "One process equals two").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from test_training_scripts import accelerate_launch, script_module

from fastgen_diffusers.models.ppap import PPAPGuideNet
from fastgen_diffusers.shapes.judge import ShapesJudgeNet

UPDATE_TOLERANCE = 1e-3


def launch_both(script: str, tmp_path: Path, batch_size: int, *args: str, env: dict | None = None) -> tuple[Path, Path]:
    """Run `script` on one process with batch 2B and on two with B each; return their output folders."""
    one, two = tmp_path / "one-process", tmp_path / "two-processes"
    accelerate_launch(script, "--output_dir", str(one), "--train_batch_size", str(2 * batch_size), *args, env=env)
    accelerate_launch(script, "--output_dir", str(two), "--train_batch_size", str(batch_size), *args, env=env,
                      num_processes=2)  # fmt: skip
    return one, two


def journal(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "step_log.jsonl").read_text().splitlines()]


def assert_same_samples_each_step(one: Path, two: Path, steps: int, global_batch: int) -> None:
    """Each step's samples, gathered over the processes, are the one process's (as a multiset: the order inside a
    step differs, since each process takes its own share)."""
    one_steps, two_steps = journal(one), journal(two)
    assert [entry["step"] for entry in one_steps] == [entry["step"] for entry in two_steps] == list(range(1, steps + 1))
    for a, b in zip(one_steps, two_steps):
        assert len(a["samples"]) == len(b["samples"]) == global_batch, a["step"]
        assert sorted(a["samples"]) == pytest.approx(sorted(b["samples"]), rel=1e-12), f"step {a['step']}"
    assert len({tuple(sorted(entry["samples"])) for entry in one_steps}) == steps  # the steps saw different data


def rng_states(checkpoint: Path) -> list[torch.Tensor]:
    """Each process's torch RNG state as accelerate saved it (pickles the test itself wrote: trusted)."""
    files = sorted(checkpoint.glob("random_states_*.pkl"))
    return [torch.load(file, weights_only=False)["torch_manual_seed"] for file in files]


def assert_processes_draw_their_own_noise(checkpoint: Path) -> None:
    states = rng_states(checkpoint)
    assert len(states) == 2
    assert not torch.equal(states[0], states[1]), "both processes drew from the same random stream"


def checkpoint_pickles(checkpoint: Path, pattern: str) -> list:
    """Accelerate's pickled states in a checkpoint the test itself wrote (trusted): optimizers, EMA."""
    return [torch.load(file, weights_only=False) for file in sorted(checkpoint.glob(pattern))]


def assert_same_optimisation(one: Path, two: Path, optimizer_updates: list[int] | None = None) -> None:
    """The last checkpoints of both runs: every optimizer at the same learning rate after the same number of
    updates (`optimizer_updates`, one count per optimizer, when given), and every EMA after the same number of
    steps. A scheduler stepped per process without scaling, or an update per micro-batch, shows here."""
    one_optimizers, two_optimizers = checkpoint_pickles(one, "optimizer*.bin"), checkpoint_pickles(two, "optimizer*.bin")
    assert len(one_optimizers) == len(two_optimizers) >= 1
    for i, (a, b) in enumerate(zip(one_optimizers, two_optimizers)):
        assert [g["lr"] for g in a["param_groups"]] == pytest.approx([g["lr"] for g in b["param_groups"]], rel=1e-9)
        updates = {int(state["step"]) for state in a["state"].values()} | {int(state["step"]) for state in b["state"].values()}
        assert len(updates) == 1, f"optimizer {i}: update counts {updates}"
        if optimizer_updates is not None:
            assert updates == {optimizer_updates[i]}, f"optimizer {i}"
    one_emas, two_emas = checkpoint_pickles(one, "custom_checkpoint_*.pkl"), checkpoint_pickles(two, "custom_checkpoint_*.pkl")
    assert [e["optimization_step"] for e in one_emas] == [e["optimization_step"] for e in two_emas]


def learning_rates(checkpoint: Path) -> list[float]:
    return [g["lr"] for optimizer in checkpoint_pickles(checkpoint, "optimizer*.bin") for g in optimizer["param_groups"]]


def assert_same_weights(
    one: dict[str, torch.Tensor], two: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], max_move: float
) -> None:
    """The two runs' weights differ by under `UPDATE_TOLERANCE` of what training moved them (in norm over all
    weights), and training did move them, by at most `max_move` a weight (so `initial` is the run's start: Adam moves
    a weight by at most ~3.2 learning rates an update, while a wrong start would be off by the weights' own size).

    Not elementwise 1e-5: Adam divides each gradient by its own running scale, so where a gradient is ~0 its sign is
    float noise (summation order differs between one batch of 2B and two of B) and that weight moves up to the
    learning rate apart in the two runs. Measured: a handful of elements in 10^5, ||difference|| / ||update|| about
    3e-5. Different data, or a step taken on part of the batch, gives a ratio near 1.
    """
    assert one.keys() == two.keys()
    names = [name for name in one if not torch.equal(one[name], initial[name])]  # trained (not a frozen part)
    assert names, "training changed no weight"
    difference = torch.cat([(one[name] - two[name]).flatten().double() for name in names]).norm()
    moves = torch.cat([(one[name] - initial[name]).flatten().double() for name in names])
    assert moves.abs().max() <= max_move, f"moved {moves.abs().max():.2e}: `initial` is not where the run started"
    update = moves.norm()
    assert difference <= UPDATE_TOLERANCE * update, f"||one - two|| / ||update|| = {difference / update:.2e}"
    for name in set(one) - set(names):  # untrained weights: identical in both runs
        torch.testing.assert_close(one[name], two[name], atol=1e-6, rtol=0, msg=name)


def initial_weights(make_model) -> dict[str, torch.Tensor]:
    """A script's freshly initialised network, rebuilt here from the same seed (`--seed 0`, set by `run.start_run`)."""
    from accelerate.utils import set_seed

    set_seed(0)
    return {name: tensor.detach().clone() for name, tensor in make_model().state_dict().items()}


# ----------------------------------------------------------------------------- the judge (default run)

JUDGE_ARGS = ["--num_train_samples", "64", "--num_eval_samples", "8", "--checkpointing_steps", "100",
              "--noise_std", "0"]  # fmt: skip


def test_judge_one_process_equals_two_with_gradient_accumulation(tmp_path):
    """The judge without its pixel noise (`--noise_std 0`) is deterministic given the data: same weights.

    With `--gradient_accumulation_steps 2`, each step is 2 micro-batches: B x 2 processes x 2 = 2B x 2 = 4B
    samples, and `accelerator.backward` divides each micro-batch's loss by 2, so the update is the mean over 4B in
    both runs. 3 steps of 16 samples in an epoch of 64 (a new epoch's order after step 4 is not reached).
    """
    steps = 3
    one, two = launch_both("train_judge.py", tmp_path, 4, "--max_train_steps", str(steps),
                           "--gradient_accumulation_steps", "2", *JUDGE_ARGS)  # fmt: skip
    assert_same_samples_each_step(one, two, steps, global_batch=16)
    assert_same_weights(
        load_file(one / "diffusion_pytorch_model.safetensors"),
        load_file(two / "diffusion_pytorch_model.safetensors"),
        initial_weights(ShapesJudgeNet),
        max_move=4 * 1e-3 * steps,  # --learning_rate 1e-3
    )
    assert_processes_draw_their_own_noise(two / f"checkpoint-{steps}")
    losses = [(a["loss"], b["loss"]) for a, b in zip(journal(one), journal(two))]
    assert [a for a, _ in losses] == pytest.approx([b for _, b in losses], rel=1e-4)  # logged: the global mean
    assert_same_optimisation(one / f"checkpoint-{steps}", two / f"checkpoint-{steps}", optimizer_updates=[steps])


# ----------------------------------------------------------------------------- the other scripts (slow)


@pytest.mark.slow
def test_ppap_guide_one_process_equals_two(tmp_path):
    """A PPAP guide without its pixel noise (`--noise_std 0`) is deterministic given the data: same weights."""
    steps = 2
    one, two = launch_both("train_ppap_guides.py", tmp_path, 4, "--task", "classification", "--max_train_steps",
                           str(steps), "--num_train_samples", "32", "--num_eval_samples", "8", "--noise_std", "0")  # fmt: skip
    assert_same_samples_each_step(one, two, steps, global_batch=8)
    assert_same_weights(load_file(one / "diffusion_pytorch_model.safetensors"),
                        load_file(two / "diffusion_pytorch_model.safetensors"),
                        initial_weights(lambda: PPAPGuideNet(num_outputs=4)), max_move=4 * 1e-3 * steps)  # fmt: skip
    assert_processes_draw_their_own_noise(two / f"checkpoint-{steps}")
    assert_same_optimisation(one / f"checkpoint-{steps}", two / f"checkpoint-{steps}", optimizer_updates=[steps])


@pytest.fixture
def deterministic_vae(tiny_sd_path, tmp_path) -> Path:
    """The tiny SD VAE with its posterior's log-variance pinned at -30 (std 3e-7): its samples are its means, to
    float precision, so a run's only randomness is gone."""
    vae = AutoencoderKL.from_pretrained(tiny_sd_path / "vae")
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0.0
        vae.quant_conv.bias[channels:] = -30.0
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


TINY_DECODER_ARGS = ["--dataset_name", "shapesworld", "--num_train_samples", "32", "--decoder_block_out_channels",
                     "8", "8", "--num_decoder_blocks", "1", "1", "--checkpointing_steps", "100", "--validation_steps",
                     "100", "--num_eval_samples", "8", "--vae_subfolder", ""]  # fmt: skip


@pytest.mark.slow
def test_tiny_decoder_one_process_equals_two(deterministic_vae, tmp_path):
    """The tiny decoder draws a posterior sample and latent noise per process. With no latent noise
    (`--latent_noise_std 0`) and a VAE whose posterior std is 3e-7, what is left is deterministic: same weights.
    With the noise on, the processes' RNG states still differ (checked)."""
    steps = 2
    common = ["--pretrained_model_name_or_path", str(deterministic_vae), "--max_train_steps", str(steps),
              *TINY_DECODER_ARGS]  # fmt: skip
    one, two = launch_both("train_tiny_decoder.py", tmp_path, 4, *common, "--latent_noise_std", "0")
    assert_same_samples_each_step(one, two, steps, global_batch=8)
    vae = AutoencoderKL.from_pretrained(deterministic_vae)
    make_tiny_decoder = script_module("train_tiny_decoder").make_tiny_decoder
    assert_same_weights(load_file(one / "diffusion_pytorch_model.safetensors"),
                        load_file(two / "diffusion_pytorch_model.safetensors"),
                        initial_weights(lambda: make_tiny_decoder(vae, [8, 8], [1, 1])),
                        max_move=4 * 1e-3 * steps)  # fmt: skip
    assert_processes_draw_their_own_noise(two / f"checkpoint-{steps}")
    assert_same_optimisation(one / f"checkpoint-{steps}", two / f"checkpoint-{steps}", optimizer_updates=[steps])


# ---- reflow (2-RF and the one-step distillation) on pairs from the tiny teacher


@pytest.fixture(scope="module")
def tiny_pairs(tiny_sd_path, tmp_path_factory) -> Path:
    """12 pairs from the tiny SD teacher (the pairs themselves do not depend on the number of processes:
    tests/test_reflow_training.py::test_pairs_do_not_depend_on_the_number_of_processes)."""
    out = tmp_path_factory.mktemp("pairs") / "pairs"
    accelerate_launch("generate_reflow_pairs.py", "--pretrained_model_name_or_path", str(tiny_sd_path),
                      "--output_dir", str(out), "--num_pairs", "12", "--shard_size", "12", "--batch_size", "12",
                      "--num_inference_steps", "2", "--guidance_scale", "2.0", "--shapesworld_prompts", "12")  # fmt: skip
    return out


REFLOW_ARGS = ["--max_train_steps", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "4", "--ema_decay", "0.5",
               "--checkpointing_steps", "100", "--validation_steps", "100", "--num_validation_images", "2"]  # fmt: skip


@pytest.mark.slow
def test_instaflow_distillation_one_process_equals_two(tiny_sd_path, tiny_pairs, tmp_path):
    """The one-step distillation (`--distill`) reads the UNet at time 1000 on the pairs' own noise: nothing is drawn,
    so the EMA weights it saves (EMA decay 0.5: the EMA moves) and the warm-up learning rate are the same."""
    base = ["--pretrained_model_name_or_path", str(tiny_sd_path), "--pairs_dir", str(tiny_pairs)]
    one, two = launch_both("train_rectified_flow.py", tmp_path, 2, *base, "--distill", *REFLOW_ARGS,
                           env={"HF_DATASETS_CACHE": str(tmp_path / "cache")})  # fmt: skip
    assert_same_samples_each_step(one, two, 2, global_batch=4)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert_same_weights(load_file(one / weights), load_file(two / weights), load_file(tiny_sd_path / weights),
                        max_move=4 * 1e-3 * 2)  # fmt: skip
    assert [e["lr"] for e in journal(one)] == pytest.approx([e["lr"] for e in journal(two)], rel=1e-9)
    assert journal(one)[-1]["lr"] == pytest.approx(1e-3 * 2 / 4)  # the warm-up counted in optimizer updates
    assert_same_optimisation(one / "checkpoint-2", two / "checkpoint-2", optimizer_updates=[2])


@pytest.mark.slow
def test_two_rectified_flow_one_process_equals_two_but_its_times(tiny_sd_path, tiny_pairs, tmp_path):
    """2-RF draws a time tau per sample, from each process's own stream: the weights cannot match a one-process
    run (process 1's taus are not the one process's second half). What holds: the same pairs each step, the same
    warm-up learning rate and EMA count, and the processes' streams differ."""
    base = ["--pretrained_model_name_or_path", str(tiny_sd_path), "--pairs_dir", str(tiny_pairs)]
    one, two = launch_both("train_rectified_flow.py", tmp_path, 2, *base, *REFLOW_ARGS,
                           env={"HF_DATASETS_CACHE": str(tmp_path / "cache")})  # fmt: skip
    assert_same_samples_each_step(one, two, 2, global_batch=4)
    assert [e["lr"] for e in journal(one)] == pytest.approx([e["lr"] for e in journal(two)], rel=1e-9)
    assert_same_optimisation(one / "checkpoint-2", two / "checkpoint-2", optimizer_updates=[2])
    assert_processes_draw_their_own_noise(two / "checkpoint-2")


# ---- the per-rank-noise scripts: teacher, SNOOPI, OMS, PPAP experts


@pytest.mark.slow
def test_teacher_one_process_equals_two_but_its_noise(tmp_path):
    """The teacher draws posterior samples (VAE stage), noise and timesteps (UNet stage) per process: the weights
    cannot match. What holds: the same images and captions each step (1 VAE step, 2 UNet steps), the same warm-up
    learning rate, optimizer and EMA counts, and the processes' streams differ."""
    args = ["--scale", "micro", "--num_train_samples", "32", "--vae_train_steps", "1", "--max_train_steps", "2",
            "--lr_warmup_steps", "4", "--checkpointing_steps", "100", "--validation_steps", "100",
            "--num_validation_images", "2"]  # fmt: skip
    one, two = launch_both("train_teacher.py", tmp_path, 2, *args)
    assert_same_samples_each_step(one, two, 3, global_batch=4)
    assert_same_optimisation(one / "checkpoint-3", two / "checkpoint-3", optimizer_updates=[1, 2])
    assert learning_rates(one / "checkpoint-3")[1] == pytest.approx(5e-4 * 2 / 4)  # the UNet's warm-up
    assert_processes_draw_their_own_noise(two / "checkpoint-3")


@pytest.mark.slow
def test_snoopi_one_process_equals_two_but_its_noise(tiny_sd_path, tmp_path):
    """SNOOPI draws the student's input noise, timesteps and per-sample guidance scales per process: the weights
    cannot match. What holds: the same prompts each step, the student's and fake score's learning rates and update
    counts (the fake score updates twice a step here), the EMA count, and the processes' streams differ."""
    args = ["--pretrained_model_name_or_path", str(tiny_sd_path), "--max_train_steps", "2", "--shapesworld_prompts",
            "16", "--fake_lora_rank", "4", "--fake_lora_alpha", "4", "--fake_updates_per_step", "2",
            "--lr_warmup_steps", "4", "--checkpointing_steps", "100", "--validation_steps", "100",
            "--num_validation_images", "2"]  # fmt: skip
    one, two = launch_both("train_snoopi.py", tmp_path, 2, *args)
    assert_same_samples_each_step(one, two, 2, global_batch=4)
    assert_same_optimisation(one / "checkpoint-2", two / "checkpoint-2", optimizer_updates=[2, 4])
    assert_processes_draw_their_own_noise(two / "checkpoint-2")


@pytest.mark.slow
def test_oms_one_process_equals_two_but_its_noise(tiny_sd_path, tmp_path):
    """OMS regresses v on fresh unit noise, with posterior samples and caption dropout, all per process: the
    weights cannot match. What holds: the same images each step, learning rate, update and EMA counts, and the
    processes' streams differ."""
    args = ["--pretrained_model_name_or_path", str(tiny_sd_path), "--max_train_steps", "2", "--num_train_samples",
            "32", "--lr_warmup_steps", "4", "--checkpointing_steps", "100", "--validation_steps", "100",
            "--num_validation_images", "2", "--block_out_channels", "4", "8", "--norm_num_groups", "2",
            "--attention_head_dim", "2"]  # fmt: skip
    one, two = launch_both("train_oms.py", tmp_path, 2, *args)
    assert_same_samples_each_step(one, two, 2, global_batch=4)
    assert_same_optimisation(one / "checkpoint-2", two / "checkpoint-2", optimizer_updates=[2])
    assert_processes_draw_their_own_noise(two / "checkpoint-2")


@pytest.mark.slow
def test_ppap_experts_one_process_equals_two_but_their_noise(tiny_sd_path, tmp_path):
    """The experts learn on latents noised at random log-SNRs, drawn per process: the weights cannot match. What
    holds: the generated latents (one generator per shard) and so the samples each step, the per-expert learning
    rate decay and update count, and the processes' streams differ (before the fix, every process drew the same
    noise: the script never seeded the processes apart)."""
    guide = tmp_path / "guide"
    accelerate_launch("train_ppap_guides.py", "--task", "classification", "--output_dir", str(guide),
                      "--max_train_steps", "1", "--train_batch_size", "4", "--num_train_samples", "16",
                      "--num_eval_samples", "8")  # fmt: skip
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red\na small at the top\n")
    args = ["--guide_path", str(guide), "--pretrained_model_name_or_path", str(tiny_sd_path), "--prompts_file",
            str(prompts), "--num_inference_steps", "2", "--num_experts", "2", "--max_train_steps", "4",
            "--num_generated", "20", "--num_validation_generated", "4", "--shard_size", "10",
            "--generation_batch_size", "10", "--checkpointing_steps", "100"]  # fmt: skip
    one, two = launch_both("train_ppap_experts.py", tmp_path, 2, *args)
    assert_same_samples_each_step(one, two, 4, global_batch=4)
    # Expert 1 starts from expert 0, its Adam state included: 4 updates in all.
    assert_same_optimisation(one / "checkpoint-4", two / "checkpoint-4", optimizer_updates=[4])
    assert_processes_draw_their_own_noise(two / "checkpoint-4")
