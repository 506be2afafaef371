"""The reflow fit-gap diagnostic (benchmarks/reflow_fit_gap.py): per-pair teacher-match errors on pair shards."""

import importlib.util
from pathlib import Path

import pytest
import torch

from fastgen_diffusers import FastPipeline
from fastgen_diffusers.training.reflow import load_pairs, write_pair_shard

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reflow_fit_gap.py"
spec = importlib.util.spec_from_file_location("reflow_fit_gap", SCRIPT)
reflow_fit_gap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reflow_fit_gap)

PROMPTS = ["a red circle", "a blue square", "a green cross", "a triangle"]


@pytest.fixture(scope="module")
def own_pairs(tiny_sd_path, tmp_path_factory):
    """Two shards of pairs from the tiny teacher itself (DDIM, 3 steps, CFG 2): its own map, which it must match."""
    pipe = FastPipeline.from_pretrained(str(tiny_sd_path))
    pipe.set_progress_bar_config(disable=True)
    pairs_dir = tmp_path_factory.mktemp("own-pairs")
    for shard in range(2):
        noise = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(shard))
        latents = pipe(PROMPTS, latents=noise, num_inference_steps=3, guidance_scale=2.0, output_type="latent").images
        write_pair_shard(pairs_dir, shard, range(4 * shard, 4 * shard + 4), noise, latents, PROMPTS)
    return pipe, pairs_dir


def test_the_teacher_matches_its_own_pairs_and_other_settings_do_not(own_pairs):
    pipe, pairs_dir = own_pairs
    pairs = load_pairs(pairs_dir)
    same = reflow_fit_gap.teacher_match_errors(pipe, pairs, 3, 2.0, batch_size=3)  # batches that split shards
    other = reflow_fit_gap.teacher_match_errors(pipe, pairs, 2, 2.0)
    assert same.shape == (8,) and same.max() < 1e-6
    assert other.min() > 100 * same.max()
    summary = reflow_fit_gap.summarize(torch.tensor([0.1, 0.3, 0.5, 0.05]), far=0.2)
    assert summary == pytest.approx({"n": 4, "mean": 0.2375, "median": 0.1, "far_share": 0.5})


def test_the_script_reports_both_sets(own_pairs, tmp_path, tiny_sd_path):
    _, pairs_dir = own_pairs
    out = tmp_path / "gap.json"
    record = reflow_fit_gap.main(
        ["--model", str(tiny_sd_path), "--pairs-dir", str(pairs_dir), "--fit-shards", "0", "--held-out-shards", "1",
         "--n", "4", "--steps", "2", "--guidance-scale", "2", "--json", str(out)]
    )  # fmt: skip
    assert out.is_file() and record["fit"]["n"] == record["held_out"]["n"] == 4
    assert record["fit"]["mean"] > 0 and record["held_out"]["shards"] == [1]
    with pytest.raises(ValueError, match=r"no complete shard \[5\]"):
        reflow_fit_gap.main(["--model", str(tiny_sd_path), "--pairs-dir", str(pairs_dir), "--fit-shards", "0",
                             "--held-out-shards", "5", "--n", "4"])  # fmt: skip
    with pytest.raises(SystemExit):  # argparse: the two sets overlap
        reflow_fit_gap.parse_args(["--model", "m", "--pairs-dir", "p", "--fit-shards", "0", "--held-out-shards", "0"])
