"""Safe loading: safetensors only unless the caller opts in to pickles, and a truncated or corrupted file of each kind
the package loads raises an error that names the file (not a crash deep inside safetensors, pyarrow or torch)."""

import argparse
import random
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import AutoencoderTiny, StableDiffusionPipeline
from safetensors.torch import load_file
from test_oms import oms_pipe

from fastgen_diffusers import FastPipeline
from fastgen_diffusers.cli import attach_oms, build_parser, load_decoder
from fastgen_diffusers.guidance.ppap import PPAPGuidance
from fastgen_diffusers.models.ppap import PPAPGuideNet
from fastgen_diffusers.training import reflow
from fastgen_diffusers.training.checkpointing import resolve_resume_path, save_checkpoint
from fastgen_diffusers.training.lora import save_unet_lora, unet_lora_config
from fastgen_diffusers.utils.safe_loading import check_weight_files

CORRUPTIONS = ["truncated", "header_flipped"]


def corrupt(path: Path, how: str, seed: int = 0) -> None:
    """Cut the file at a random byte, or flip the bits of its first bytes (the header's length, a magic number)."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: random.Random(f"{path.name}{seed}").randrange(1, len(data))])
    else:
        path.write_bytes(bytes(b ^ 0xFF for b in data[:4]) + data[4:])


def assert_names_the_file(error: pytest.ExceptionInfo, path: Path) -> None:
    assert isinstance(error.value, (ValueError, OSError)), repr(error.value)
    assert str(path) in str(error.value), str(error.value)


@pytest.fixture
def pipeline_folder(tiny_sd_path, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_sd_path, tmp_path / "pipeline"))


# ---- pipeline folders (Diffusers components and the transformers text encoder) ----


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("component", ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"])
def test_damaged_pipeline_file_is_named(pipeline_folder, component, how):
    corrupt(pipeline_folder / component, how)
    with pytest.raises(ValueError) as error:
        FastPipeline.from_pretrained(pipeline_folder)
    assert_names_the_file(error, pipeline_folder / component)


def test_pickle_weights_need_the_opt_in(pipeline_folder):
    reference = StableDiffusionPipeline.from_pretrained(pipeline_folder).unet
    reference.save_pretrained(pipeline_folder / "unet", safe_serialization=False)
    (pipeline_folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True") as error:
        FastPipeline.from_pretrained(pipeline_folder)
    assert_names_the_file(error, pipeline_folder / "unet" / "diffusion_pytorch_model.bin")

    pipe = FastPipeline.from_pretrained(pipeline_folder, allow_pickle=True)  # the caller trusts the file
    for (name, loaded), expected in zip(pipe.unet.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5, msg=name)


# ---- a tiny decoder, a LoRA, an OMS module: Diffusers' own loaders already name the file ----


def saved_tiny_decoder(folder: Path) -> Path:
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))  # fmt: skip
    tiny.save_pretrained(folder)
    return folder


def as_pickle(weights: Path, pickle_name: str) -> Path:
    """Replace a safetensors file by the same tensors in a `torch.save` pickle beside it (what older tools write)."""
    pickle = weights.with_name(pickle_name)
    torch.save(load_file(weights), pickle)
    weights.unlink()
    return pickle


def cli_error(capsys, load) -> str:
    """What a CLI loader prints before it exits with status 2 (argparse's `parser.error`)."""
    with pytest.raises(SystemExit) as exit_info:
        load()
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_damaged_tiny_decoder_is_named_by_the_cli(tmp_path, capsys, how):
    folder = saved_tiny_decoder(tmp_path / "tiny")
    assert isinstance(load_decoder(str(folder), build_parser()), AutoencoderTiny)  # whole: loads
    weights = folder / "diffusion_pytorch_model.safetensors"
    corrupt(weights, how)
    message = cli_error(capsys, lambda: load_decoder(str(folder), build_parser()))
    assert "--decoder" in message and str(weights) in message and "Traceback" not in message


def test_pickled_tiny_decoder_is_refused_by_the_cli(tmp_path, capsys):
    folder = saved_tiny_decoder(tmp_path / "tiny")
    pickle = as_pickle(folder / "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    message = cli_error(capsys, lambda: load_decoder(str(folder), build_parser()))
    assert str(pickle) in message and "pickle" in message


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_damaged_lora_is_named(pipeline_folder, tmp_path, how):
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_folder)
    pipe.unet.add_adapter(unet_lora_config(rank=2, alpha=2))
    save_unet_lora(StableDiffusionPipeline, pipe.unet, tmp_path / "lora")
    weights = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    corrupt(weights, how)
    with pytest.raises((OSError, ValueError)) as error:
        StableDiffusionPipeline.from_pretrained(pipeline_folder).load_lora_weights(str(tmp_path / "lora"))
    assert_names_the_file(error, weights)
    with pytest.raises(ValueError) as error:
        check_weight_files(tmp_path / "lora")
    assert_names_the_file(error, weights)


def test_pickled_lora_is_refused(pipeline_folder, tmp_path):
    """Diffusers' `load_lora_weights` falls back to `pytorch_lora_weights.bin`; the package's own LoRA loading
    (train_snoopi's export) passes `use_safetensors=True`, and `check_weight_files` refuses the pickle."""
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_folder)
    pipe.unet.add_adapter(unet_lora_config(rank=2, alpha=2))
    save_unet_lora(StableDiffusionPipeline, pipe.unet, tmp_path / "lora")
    pickle = as_pickle(tmp_path / "lora" / "pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True") as error:
        check_weight_files(tmp_path / "lora")
    assert_names_the_file(error, pickle)
    with pytest.raises((OSError, ValueError)):
        StableDiffusionPipeline.from_pretrained(pipeline_folder).load_lora_weights(
            str(tmp_path / "lora"), use_safetensors=True
        )


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("own_text_encoder", [False, True])
def test_damaged_oms_module_is_named(pipeline_folder, tmp_path, how, own_text_encoder):
    base = StableDiffusionPipeline.from_pretrained(pipeline_folder)
    extra = {"oms_text_encoder": base.text_encoder, "oms_tokenizer": base.tokenizer} if own_text_encoder else {}
    oms_pipe(base, **extra).save_pretrained(tmp_path / "oms")
    weights = tmp_path / "oms" / ("oms_text_encoder/model.safetensors" if own_text_encoder else
                                  "oms_model/diffusion_pytorch_model.safetensors")  # fmt: skip
    corrupt(weights, how)
    with pytest.raises(ValueError) as error:
        FastPipeline.from_pretrained(pipeline_folder, oms=tmp_path / "oms")
    assert_names_the_file(error, weights)


def cli_oms_args(oms: Path) -> argparse.Namespace:
    return argparse.Namespace(oms=str(oms), oms_prompt=None, oms_guidance_scale=None, model="tiny")


def test_oms_module_through_the_cli_is_checked(pipeline_folder, tmp_path, capsys):
    """`fastgen --oms` loads the module itself (`cli.attach_oms`): safetensors only, a damaged file named."""
    base = StableDiffusionPipeline.from_pretrained(pipeline_folder)
    oms_pipe(base).save_pretrained(tmp_path / "oms")
    attach_oms(base, cli_oms_args(tmp_path / "oms"), build_parser())  # whole: loads
    weights = tmp_path / "oms" / "oms_model" / "diffusion_pytorch_model.safetensors"
    corrupt(weights, "truncated")
    message = cli_error(capsys, lambda: attach_oms(base, cli_oms_args(tmp_path / "oms"), build_parser()))
    assert "--oms" in message and str(weights) in message

    oms_pipe(base).save_pretrained(tmp_path / "oms")
    pickle = as_pickle(weights, "diffusion_pytorch_model.bin")
    message = cli_error(capsys, lambda: attach_oms(base, cli_oms_args(tmp_path / "oms"), build_parser()))
    assert str(pickle) in message and "pickle" in message


# ---- PPAP guidance: the guide through Diffusers, the experts through peft ----


def saved_ppap(folder: Path) -> Path:
    torch.manual_seed(0)
    guide = PPAPGuideNet(num_outputs=4, block_out_channels=(8, 16), norm_num_groups=4, head_dim=16)
    PPAPGuidance.from_guide(guide, "classification", list("abcd"), num_experts=2).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize(
    "weights",
    [
        "guide/diffusion_pytorch_model.safetensors",
        "experts/expert_1/adapter_model.safetensors",
    ],
)
def test_damaged_ppap_guidance_is_named(tmp_path, weights, how):
    folder = saved_ppap(tmp_path / "ppap")
    corrupt(folder / weights, how)
    with pytest.raises(ValueError) as error:
        PPAPGuidance.from_pretrained(folder)
    assert_names_the_file(error, folder / weights)


@pytest.mark.parametrize(
    "weights, pickle_name",
    [
        ("guide/diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
        ("experts/expert_1/adapter_model.safetensors", "adapter_model.bin"),
    ],
)
def test_pickled_ppap_guidance_needs_the_opt_in(tmp_path, weights, pickle_name):
    folder = saved_ppap(tmp_path / "ppap")
    reference = PPAPGuidance.from_pretrained(folder)
    pickle = as_pickle(folder / weights, pickle_name)
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True") as error:
        PPAPGuidance.from_pretrained(folder)
    assert_names_the_file(error, pickle)

    loaded = PPAPGuidance.from_pretrained(folder, allow_pickle=True)  # the caller trusts the file
    for module in ("guide", "experts"):
        expected = getattr(reference, module).state_dict()
        for name, tensor in getattr(loaded, module).state_dict().items():
            torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=1e-5, msg=f"{module}.{name}")


# ---- the models a training script starts from ----


@pytest.fixture
def fresh_accelerator_state():
    """A script's `main` run in this process builds its own `Accelerator`: start and end with no shared state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_training_scripts_refuse_a_pickled_starting_model(pipeline_folder, tmp_path, fresh_accelerator_state):
    """Each script that loads a model it starts from (a base pipeline, a VAE, a guide) checks its files first: a
    pickled component is refused, naming the file, before any training."""
    from test_training_scripts import script_module

    pickle = as_pickle(pipeline_folder / "vae" / "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    guide_folder = tmp_path / "guide"
    PPAPGuideNet(num_outputs=4, block_out_channels=(8, 16), norm_num_groups=4, head_dim=16).save_pretrained(guide_folder)
    guide_pickle = as_pickle(guide_folder / "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    base = ["--pretrained_model_name_or_path", str(pipeline_folder), "--max_train_steps", "1"]
    runs = {
        "train_oms": (base, pickle),
        "train_snoopi": ([*base, "--shapesworld_prompts", "8"], pickle),
        "train_teacher": (["--scale", "micro", "--max_train_steps", "1", "--vae_train_steps", "0", "--vae_from",
                           str(pipeline_folder / "vae")], pickle),  # fmt: skip
        "train_ppap_experts": ([*base, "--guide_path", str(guide_folder), "--task", "classification", "--labels",
                                *"abcd", "--prompts_file", str(prompts), "--num_experts", "1"], guide_pickle),  # fmt: skip
    }
    for script, (args, refused) in runs.items():
        with pytest.raises(ValueError, match="pickle") as error:
            script_module(script).main([*args, "--output_dir", str(tmp_path / script)])
        assert_names_the_file(error, refused)


# ---- training checkpoints (accelerate's state: safetensors weights, pickled optimizer and RNG states) ----


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.bin", "random_states_0.pkl"])
def test_damaged_training_checkpoint_is_named_before_resuming(tmp_path, file, how):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    checkpoint = save_checkpoint(accelerator, tmp_path, step=1, total_limit=None)
    assert resolve_resume_path(tmp_path, "latest") == checkpoint  # whole: resumes
    corrupt(checkpoint / file, how)
    for resume_from in ("latest", str(checkpoint)):
        with pytest.raises(ValueError) as error:
            resolve_resume_path(tmp_path, resume_from)
        assert_names_the_file(error, checkpoint / file)


# ---- reflow pair shards (parquet) ----


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_damaged_pair_shard_is_named(tmp_path, how):
    for shard in range(2):
        noise, latents = torch.randn(2, 2, 2, 4, 4).unbind(0)
        reflow.write_pair_shard(tmp_path / "pairs", shard, [2 * shard, 2 * shard + 1], noise, latents, ["a", "b"])
    assert len(reflow.load_pairs(tmp_path / "pairs", cache_dir=str(tmp_path / "cache"))) == 4  # whole: loads
    damaged = reflow.shard_path(tmp_path / "pairs", 1)
    corrupt(damaged, how)
    with pytest.raises(ValueError) as error:
        reflow.load_pairs(tmp_path / "pairs", cache_dir=str(tmp_path / "cache-2"))
    assert_names_the_file(error, damaged)


def test_checks_skip_training_state_and_hub_ids(pipeline_folder):
    (pipeline_folder / "checkpoint-3").mkdir()
    (pipeline_folder / "checkpoint-3" / "optimizer.bin").write_bytes(b"not looked at when loading the model")
    check_weight_files(pipeline_folder)
    check_weight_files("user/not-a-local-folder")  # left to the Hub client, which gets use_safetensors=True


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_damaged_or_pickled_judge_is_named(tmp_path, how):
    from fastgen_diffusers.shapes.judge import ShapesJudge, ShapesJudgeNet

    folder = tmp_path / "judge"
    ShapesJudgeNet().save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    corrupt(weights, how)
    with pytest.raises(ValueError) as error:
        ShapesJudge.from_pretrained(folder)
    assert_names_the_file(error, weights)

    pickled = tmp_path / "pickled"
    ShapesJudgeNet().save_pretrained(pickled, safe_serialization=False)
    with pytest.raises(ValueError, match="pickle") as error:
        ShapesJudge.from_pretrained(pickled)
    assert_names_the_file(error, pickled / "diffusion_pytorch_model.bin")


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_damaged_student_checkpoint_is_named(tiny_sd_path, tmp_path, how):
    from safetensors.torch import save_file

    from fastgen_diffusers.training.students import load_student_checkpoint

    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "training_args.json").write_text(
        '{"pretrained_model_name_or_path": "%s", "student_timestep": 999, "use_lora": false}' % tiny_sd_path
    )
    weights = run / "checkpoint-1" / "student.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, weights)
    corrupt(weights, how)
    with pytest.raises(ValueError) as error:
        load_student_checkpoint(run, "checkpoint-1")
    assert_names_the_file(error, weights)
