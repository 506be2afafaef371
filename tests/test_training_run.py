"""The pieces every training script shares: per-process seeding, model cards, validation grids, Hub ids."""

import argparse
import json
import textwrap

import pytest
from PIL import Image
from test_training_scripts import accelerate_launch

from fastgen_diffusers.training import run
from fastgen_diffusers.training.hub import hub_base_model, save_model_card
from fastgen_diffusers.training.validation import save_image_grid

SEEDING_PROBE = textwrap.dedent(
    """
    import argparse, json, sys
    import torch
    from torch.utils.data import DataLoader
    from fastgen_diffusers.training.run import resume_or_seed, resumed_batches, start_run

    args = argparse.Namespace(output_dir=sys.argv[1], seed=0, gradient_accumulation_steps=1, mixed_precision="no",
                              report_to=None, resume_from_checkpoint=None)
    accelerator = start_run(args)
    model = torch.nn.Linear(3, 3)  # initialised from the shared seed
    initial_weight = model.weight.detach().clone()
    dataloader = DataLoader(list(range(16)), batch_size=2, shuffle=True, drop_last=True)
    model, dataloader = accelerator.prepare(model, dataloader)
    resume_or_seed(accelerator, args, "probe")
    batch = next(resumed_batches(accelerator, dataloader, 0))
    gathered = accelerator.gather(torch.cat([initial_weight.flatten(), batch.float(), torch.randn(4)])[None])
    if accelerator.is_main_process:
        print("PROBE " + json.dumps(gathered.tolist()))
    accelerator.end_training()  # tear gloo down in order; a process that exits with it alive can abort
    """
)


def test_processes_share_initialisation_and_data_order_but_draw_their_own_noise(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(SEEDING_PROBE)
    result = accelerate_launch(str(probe), str(tmp_path / "run"), num_processes=2)
    line = next(line for line in result.stdout.splitlines() if line.startswith("PROBE "))
    rank0, rank1 = json.loads(line.removeprefix("PROBE "))
    assert rank0[:9] == rank1[:9]  # the same initial weights before DDP synchronises them
    assert not set(rank0[9:11]) & set(rank1[9:11])  # one shuffled order, split between the processes
    assert rank0[11:] != rank1[11:]  # but each process draws its own noise and timesteps


def test_validation_grid_pads_to_whole_rows(tmp_path):
    images = [Image.new("RGB", (2, 3), (255, 0, 0))] * 5
    grid = Image.open(save_image_grid(images, tmp_path / "grid.png", upscale=1))
    assert grid.size == (3 * 2, 2 * 3)  # 3 columns, 2 rows; the sixth cell is black
    assert grid.getpixel((5, 5)) == (0, 0, 0) and grid.getpixel((4, 0)) == (255, 0, 0)
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(ValueError, match="images"):
        save_image_grid([], tmp_path / "empty.png")


def test_model_card_has_hub_metadata_and_the_filled_template(tmp_path):
    fields = {"command": "train_judge.py --output_dir {x}", "n": "7", "accuracy_table": "| shape | 1.0 |"}
    card = save_model_card(tmp_path, "shapes_judge", fields, tags=["shapesworld"], base_model="user/model").read_text()
    assert card.startswith("---\n") and "base_model: user/model" in card and "- shapesworld" in card
    assert "on 7 clean evaluation images" in card and "train_judge.py --output_dir {x}" in card
    with pytest.raises(ValueError, match="template"):
        save_model_card(tmp_path, "no_such_card", fields, tags=[])


def test_hub_base_model_only_for_hub_ids(tmp_path):
    assert hub_base_model("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    assert hub_base_model("shapes-teacher") is None  # an embedded model
    assert hub_base_model(str(tmp_path)) is None  # a folder


def test_the_hub_token_is_never_recorded_in_the_run_folder(tmp_path):
    args = argparse.Namespace(output_dir=str(tmp_path), hub_token="hf_secret", seed=0, learning_rate=1e-4)
    assert run.recorded_args(args) == {"output_dir": str(tmp_path), "seed": 0, "learning_rate": 1e-4}
