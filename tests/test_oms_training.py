"""training/train_oms.py end to end on a tiny base under `accelerate launch` (run, resume, card), and its pieces."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from fastgen_diffusers import FastPipeline
from fastgen_diffusers.pipelines.oms import OMSPipeline
from fastgen_diffusers.shapes.tokenizer import build_tokenizer
from fastgen_diffusers.training.checkpointing import list_checkpoints
from test_training_scripts import accelerate_launch, script_module


TINY_OMS_ARGS = ["--num_train_samples", "64", "--train_batch_size", "4", "--checkpointing_steps", "2",
                 "--validation_steps", "2", "--num_validation_images", "2", "--block_out_channels", "4", "8",
                 "--norm_num_groups", "2", "--attention_head_dim", "2", "--ema_decay", "0.5"]  # fmt: skip


def test_train_oms_runs_resumes_and_loads_in_front_of_its_base(tiny_sd_path, tmp_path):
    out = tmp_path / "oms"
    base = ["--pretrained_model_name_or_path", str(tiny_sd_path), "--output_dir", str(out)]
    accelerate_launch("train_oms.py", *base, "--max_train_steps", "2", *TINY_OMS_ARGS)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    first = load_file(out / "oms_model" / "diffusion_pytorch_model.safetensors")

    accelerate_launch("train_oms.py", *base, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *TINY_OMS_ARGS)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    second = load_file(out / "oms_model" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.allclose(first[k], second[k]) for k in first)  # two more steps changed the module

    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "OMSPipeline" and index["oms_text_encoder"] == [None, None]
    assert index["vae_scaling_factor"] == pytest.approx(AutoencoderKL.from_pretrained(tiny_sd_path / "vae").config.scaling_factor)
    card = (out / "README.md").read_text()
    assert card.count("train_oms.py") == 2 and "--resume_from_checkpoint latest" in card  # both commands, in order
    assert (out / "validation" / "step-4.png").is_file()

    pipe = FastPipeline.from_pretrained(tiny_sd_path, oms=out)
    assert isinstance(pipe, OMSPipeline)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


def test_caption_dropout_and_the_regression_target(tmp_path):
    train_oms = script_module("train_oms")
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    rows = [{"image": Image.new("RGB", (40, 48), (255, 0, 0)), "text": "a red circle"}] * 4
    batch = train_oms.OMSCollator(tokenizer, "image", "text", resolution=32)(rows)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    always = train_oms.drop_captions(batch["input_ids"], empty, dropout=1.0)
    never = train_oms.drop_captions(batch["input_ids"], empty, dropout=0.0)
    assert torch.equal(always, empty.repeat(4, 1))
    assert torch.equal(never, batch["input_ids"]) and not torch.equal(never, always)

    # The loss is the MSE of v on fresh unit noise against v = -x0: a module that outputs -x0 has loss 0.
    latents = torch.randn(2, 4, 8, 8)

    class Oracle(torch.nn.Module):
        def forward(self, noise, encoder_hidden_states, return_dict=False):
            return (-latents,)

    assert train_oms.oms_loss(Oracle(), latents, torch.zeros(2, 3, 8)).item() == pytest.approx(0.0)


def test_bad_arguments_name_the_flag():
    train_oms = script_module("train_oms")
    common = ["--pretrained_model_name_or_path", "x", "--output_dir", "y", "--max_train_steps", "1"]
    with pytest.raises(ValueError, match="--caption_dropout_prob"):
        train_oms.parse_args([*common, "--caption_dropout_prob", "1.5"])
    with pytest.raises(ValueError, match="--ema_decay"):
        train_oms.parse_args([*common, "--ema_decay", "1"])
    with pytest.raises(ValueError, match="--first_attention_level"):
        train_oms.parse_args([*common, "--first_attention_level", "3"])  # the default three levels: 0, 1 or 2


def test_first_attention_level_leaves_the_finer_levels_plain():
    train_oms = script_module("train_oms")
    vae = AutoencoderKL(block_out_channels=(4, 4), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=2, sample_size=32)
    text_encoder = type("TextEncoder", (), {"config": type("Config", (), {"hidden_size": 8})()})()
    common = ["--pretrained_model_name_or_path", "x", "--output_dir", "y", "--max_train_steps", "1",
              "--block_out_channels", "4", "8", "8", "--norm_num_groups", "2", "--attention_head_dim", "2"]
    for level, plain_down in ((0, 0), (1, 1), (2, 2)):
        args = train_oms.parse_args([*common, "--first_attention_level", str(level)])
        model = train_oms.make_oms_model(args, vae, text_encoder, resolution=32)
        attends = [hasattr(block, "attentions") for block in model.down_blocks]
        assert attends == [False] * plain_down + [True] * (3 - plain_down)
        assert [hasattr(block, "attentions") for block in model.up_blocks] == attends[::-1]
        out = model(torch.randn(2, 4, 16, 16), torch.randn(2, 5, 8), return_dict=False)[0]
        assert out.shape == (2, 4, 16, 16)
