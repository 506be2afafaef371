"""Bad input to every `fastgen` subcommand, fuzzed with hypothesis.

Each command line either works (images and their index written) or stops with exit status 2 and an `error:` line
naming the flag: argparse's own errors, and the pipeline's or guide's refusals translated to their flag. Never a
traceback: in-process, any other exception fails the test; two cases also run the installed `fastgen` script.

`FASTGEN_FUZZ_SCALE=N` multiplies the examples, `FASTGEN_FUZZ_REPORT=path.jsonl` appends the outcome counts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fuzzing import ERROR, WORKS, fuzz, write_outcomes
from hypothesis import given
from hypothesis import strategies as st

from fastgen_diffusers.cli import main
from fastgen_diffusers.guidance import PPAPGuidance
from fastgen_diffusers.models.oms import OMSModel
from fastgen_diffusers.models.ppap import PPAPGuideNet
from fastgen_diffusers.pipelines.oms import OMSPipeline
from fastgen_diffusers.pipelines.one_step import OneStepPipeline

OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    yield
    write_outcomes("cli", OUTCOMES)


@pytest.fixture(scope="module")
def modules(tmp_path_factory, tiny_sd_path) -> dict[str, Path]:
    """An OMS module and a PPAP guide for the tiny SD checkpoint, saved as the CLI loads them; and bad files."""
    root = tmp_path_factory.mktemp("cli-modules")
    torch.manual_seed(1)
    oms_model = OMSModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=2,
    )  # fmt: skip
    scaling = json.loads((tiny_sd_path / "vae" / "config.json").read_text()).get("scaling_factor", 0.18215)
    OMSPipeline(oms_model=oms_model, vae_scaling_factor=scaling).save_pretrained(root / "oms")
    torch.manual_seed(0)
    guide = PPAPGuideNet(num_outputs=4, block_out_channels=(8, 16), norm_num_groups=4, head_dim=16)
    PPAPGuidance.from_guide(guide, "classification", ["circle", "square", "triangle", "cross"], num_experts=2
                            ).save_pretrained(root / "ppap")  # fmt: skip
    one_step = OneStepPipeline.from_pretrained(tiny_sd_path)  # a FastDiffusionPipeline: steered negative prompts
    one_step.save_pretrained(root / "one-step")
    (root / "prompts.txt").write_text("a red circle\n\na blue square\n")
    (root / "empty.txt").write_text("\n  \n")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    (root / "a-file").write_text("")
    (root / "empty-folder").mkdir()
    (root / "broken-model").mkdir()
    (root / "broken-model" / "model_index.json").write_text("{not json")
    return {"model": tiny_sd_path, "root": root}


@dataclass
class Line:
    """A command line over the valid base: the flags it sets or adds, the flag an error must name, and whether it
    must work or must fail."""

    kind: str
    flags: list[str]
    flag: str
    expect: str
    replace_model: bool = False


def line(kind: str, flag: str, expect: str, *flags: str, replace_model: bool = False) -> Line:
    return Line(kind, list(flags), flag, expect, replace_model)


def run_command(argv: list[str], item: Line, out: Path, capsys, target: str) -> str:
    capsys.readouterr()
    try:
        main(argv)
    except SystemExit as exit_info:
        error = capsys.readouterr().err
        assert item.expect == ERROR, f"{item.kind}: {argv} failed: {error[-800:]}"
        assert exit_info.code == 2, f"{item.kind}: exit {exit_info.code}"
        assert "error:" in error and item.flag in error, f"{item.kind}: {argv}: error does not name {item.flag}: {error}"
        outcome = "exit 2"
    else:
        assert item.expect == WORKS, f"{item.kind}: {argv} worked, expected an error naming {item.flag}"
        records = [json.loads(r) for r in (out / "index.jsonl").read_text().splitlines()]
        assert records and all((out / r["file"]).is_file() for r in records)
        assert len(list(out.glob("*.png"))) == len(records)
        outcome = "works"
    OUTCOMES[(target, item.kind, outcome)] += 1
    return outcome


# ---- strategies ---------------------------------------------------------------------------------------------------

NOT_A_NUMBER = st.sampled_from(["x", "", "1e", "--", "one", "0x10", "1,5"])
NOT_FINITE = st.sampled_from(["nan", "inf", "-inf", "NaN"])


def int_flag(flag: str, works: st.SearchStrategy[int], bad: st.SearchStrategy[int]) -> st.SearchStrategy[Line]:
    name = flag.lstrip("-")
    return st.one_of(
        works.map(lambda v: line(f"{name}: valid", flag, WORKS, f"{flag}={v}")),
        bad.map(lambda v: line(f"{name}: out of range", flag, ERROR, f"{flag}={v}")),
        st.one_of(NOT_A_NUMBER, NOT_FINITE, st.sampled_from(["1.5", "2.0"])).map(
            lambda v: line(f"{name}: not an integer", flag, ERROR, f"{flag}={v}")
        ),
    )


def float_flag(flag: str, works: st.SearchStrategy[float], bad: st.SearchStrategy[float], *extra: str):
    name = flag.lstrip("-")
    return st.one_of(
        works.map(lambda v: line(f"{name}: valid", flag, WORKS, f"{flag}={v!r}", *extra)),
        bad.map(lambda v: line(f"{name}: out of range", flag, ERROR, f"{flag}={v!r}", *extra)),
        st.one_of(NOT_A_NUMBER, NOT_FINITE).map(lambda v: line(f"{name}: not a finite number", flag, ERROR,
                                                               f"{flag}={v}", *extra)),
    )


def generate_lines(root: Path) -> st.SearchStrategy[Line]:
    oms, ppap, one_step = str(root / "oms"), str(root / "ppap"), str(root / "one-step")
    missing = str(root / "no-such-folder")
    return st.one_of(
        int_flag("--steps", st.integers(1, 2), st.one_of(st.integers(-(10**9), 0), st.integers(1001, 10**12))),
        float_flag("--guidance-scale", st.floats(-5, 5), st.nothing()),
        float_flag("--negative-scale", st.floats(0, 5), st.floats(max_value=-1e-6, allow_infinity=False),
                   "--negative-prompt", "a blue square", "--model", one_step),
        st.just(line("negative-scale: a model without steered attention", "--negative-scale", ERROR,
                     "--negative-scale=0.5")),
        st.sampled_from(["nasa", "nag"]).map(lambda m: line("negative-method: valid", "--negative-method", WORKS,
                                                            "--negative-method", m, "--negative-prompt", "blue",
                                                            "--model", one_step)),
        st.text(max_size=6).filter(lambda m: m not in ("nasa", "nag")).map(
            lambda m: line("negative-method: unknown", "--negative-method", ERROR, f"--negative-method={m}")
        ),
        st.text(max_size=30).map(lambda n: line("negative-prompt: any text", "--negative-prompt", WORKS,
                                                f"--negative-prompt={n}")),
        st.floats(2, 5).map(lambda g: line("negative-scale with CFG", "--negative-scale", ERROR, "--negative-scale=0.5",
                                           f"--guidance-scale={g}", "--model", one_step)),
        int_flag("--num-images", st.integers(1, 2), st.integers(-(10**6), 0)),
        int_flag("--seed", st.integers(0, 2**70), st.integers(-(10**6), -1)),
        int_flag("--batch-size", st.integers(1, 5), st.integers(-(10**6), 0)),
        st.one_of(st.text(max_size=60), st.sampled_from(["", "x" * 10_000, "-starts with a dash", "🙂" * 200])).map(
            lambda p: line("prompt: any text, empty or 10,000 characters", "--prompt", WORKS, f"--prompt={p}")
        ),
        st.sampled_from(["prompts.txt"]).map(
            lambda f: line("prompts: a file", "--prompts", WORKS, "--prompts", str(root / f))
        ),
        st.sampled_from(["empty.txt", "binary.txt", "no-such.txt", "empty-folder"]).map(
            lambda f: line("prompts: empty, binary, missing or a folder", "--prompts", ERROR, "--prompts", str(root / f))
        ),
        st.one_of(st.text(min_size=1, max_size=20).filter(lambda m: not m.startswith("-")),
                  st.sampled_from([missing, str(root / "a-file"), str(root / "empty-folder"), str(root / "broken-model"),
                                   "shapes-judge", "shapes-tiny-decoder"])).map(
            lambda m: line("model: unknown name, missing, a file or no pipeline", "--model", ERROR, f"--model={m}",
                           replace_model=True)
        ),
        st.sampled_from(["a-file/out", "a-file"]).map(
            lambda o: line("out: under a file", "--out", ERROR, "--out", str(root / o))
        ),
        st.floats(0, 3).map(lambda g: line("oms: a module, its guidance", "--oms", WORKS, "--oms", oms,
                                           f"--oms-guidance-scale={g!r}", "--oms-prompt", "a red square")),
        st.sampled_from([missing, str(root / "a-file"), str(root / "ppap"), "shapes-teacher"]).map(
            lambda m: line("oms: missing, a file, or not an OMS module", "--oms", ERROR, "--oms", m)
        ),
        st.sampled_from(["--oms-prompt=red", "--oms-guidance-scale=2"]).map(
            lambda f: line("oms flags without --oms", f.split("=")[0], ERROR, f)
        ),
        st.one_of(st.floats(max_value=-1e-6, allow_infinity=False).map(repr), NOT_FINITE, NOT_A_NUMBER).map(
            lambda g: line("oms-guidance-scale: negative, not finite or not a number", "--oms-guidance-scale", ERROR,
                           "--oms", oms, f"--oms-guidance-scale={g}")
        ),
        st.sampled_from(["circle", "cross"]).map(lambda c: line("ppap: a guide and a class", "--ppap", WORKS,
                                                                "--ppap", ppap, "--guide-class", c, "--ppap-scale=1")),
        st.text(max_size=8).filter(lambda c: c not in ("circle", "square", "triangle", "cross")).map(
            lambda c: line("ppap: unknown class", "--guide-class", ERROR, "--ppap", ppap, f"--guide-class={c}")
        ),
        st.just(line("ppap: no class or target", "--ppap", ERROR, "--ppap", ppap)),
        st.sampled_from([["--guide-target", "1", "2"], ["--guide-target", "nan", "0"]]).map(
            lambda f: line("ppap: a target for a classifier or not finite", "--guide-target", ERROR, "--ppap", ppap, *f)
        ),
        st.sampled_from([missing, str(root / "oms"), str(root / "a-file")]).map(
            lambda p: line("ppap: missing or not a PPAP folder", "--ppap", ERROR, "--ppap", p, "--guide-class", "circle")
        ),
        st.sampled_from(["--guide-class=circle", "--ppap-scale=1", "--guide-target=1"]).map(
            lambda f: line("ppap flags without --ppap", "--ppap", ERROR, f)
        ),
        st.one_of(st.floats(max_value=-1e-6, allow_infinity=False).map(repr), NOT_FINITE).map(
            lambda s: line("ppap-scale: negative or not finite", "--ppap-scale", ERROR, "--ppap", ppap,
                           "--guide-class", "circle", f"--ppap-scale={s}")
        ),
        st.sampled_from([missing, str(root / "a-file"), str(root / "oms"), "shapes-teacher"]).map(
            lambda d: line("decoder: missing, a file or not an AutoencoderTiny", "--decoder", ERROR, "--decoder", d)
        ),
        st.sampled_from(["--frobnicate", "--steps", "--n=3", "--json"]).map(
            lambda f: line("unknown flag or missing value", f.split("=")[0], ERROR, f)
        ),
    )


def test_generate(modules, tmp_path_factory, capsys):
    root = modules["root"]

    @fuzz(60)
    @given(item=generate_lines(root))
    def check(item):
        out = tmp_path_factory.mktemp("out") / "images"
        model = [] if item.replace_model else ["--model", str(modules["model"])]
        argv = ["generate", *model, "--prompt", "a red circle", "--steps", "1", "--out", str(out), *item.flags]
        if any(f.startswith("--prompts") for f in item.flags):
            argv.remove("--prompt"), argv.remove("a red circle")
        try:
            run_command(argv, item, out, capsys, "fastgen generate")
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)

    check()


def eval_lines(root: Path) -> st.SearchStrategy[Line]:
    return st.one_of(
        int_flag("--n", st.nothing(), st.integers(-(10**6), 0)),
        st.just(line("open and negative together", "--open", ERROR, "--open", "--negative")),
        st.just(line("ppap eval with a target", "--guide-class", ERROR, "--ppap", str(root / "ppap"), "--guide-class",
                     "circle")),
        float_flag("--guidance-scale", st.nothing(), st.nothing()),
        int_flag("--steps", st.nothing(), st.integers(-(10**6), 0)),
        st.sampled_from(["--prompt=x", "--out=o", "--num-images=2"]).map(
            lambda f: line("a generate-only flag", f.split("=")[0], ERROR, f)
        ),
    )


def test_eval(modules, capsys):
    @fuzz(30)
    @given(item=eval_lines(modules["root"]))
    def check(item):
        run_command(["eval", "--model", str(modules["model"]), "--n", "4", *item.flags], item, Path("."), capsys,
                    "fastgen eval")  # fmt: skip

    check()


@pytest.mark.parametrize(
    "argv, flag",
    [(["generate"], "--model"), ([], "command"), (["train"], "invalid choice"), (["eval", "--model"], "--model")],
)
def test_no_command_or_no_model(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err
    OUTCOMES[("fastgen", "no command, unknown command or no model", "exit 2")] += 1


@pytest.mark.slow  # each run imports torch and Diffusers afresh: ~35 s on a loaded machine
@pytest.mark.parametrize("flags, flag", [(["--steps", "0"], "--steps"), (["--steps", "5000"], "--steps")])
def test_installed_script_ends_without_traceback(modules, tmp_path, flags, flag):
    """The console script: exit status 2, an `error:` line naming the flag, no traceback (before and after the
    model is loaded: 5000 steps is refused by the model's scheduler)."""
    script = Path(sys.executable).with_name("fastgen")
    result = subprocess.run(
        [str(script), "generate", "--model", str(modules["model"]), "--prompt", "x", "--out", str(tmp_path), *flags],
        check=False, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error:" in result.stderr and flag in result.stderr and "Traceback" not in result.stderr
