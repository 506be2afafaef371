"""Bad flags to every training script, fuzzed with hypothesis: each command line is accepted by `parse_args`, or
ends before any model loads with argparse's exit 2 or a `ValueError`, either naming the flag.

The flags are read from each script's own parser: every int flag gets non-integers, every float
flag NaN and infinity, and the shared flags (steps, batch sizes, learning rates, seeds, mixed precision, the resume
checkpoint, data folders, model locations) values out of range. `FASTGEN_FUZZ_SCALE=N` multiplies the examples,
`FASTGEN_FUZZ_REPORT=path.jsonl` appends the outcome counts.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
from fuzzing import ERROR, WORKS, fuzz, write_outcomes
from hypothesis import given
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    yield
    write_outcomes("training", OUTCOMES)


def load_script(name: str):
    sys.path.insert(0, str(REPO / "training"))
    try:
        spec = importlib.util.spec_from_file_location(f"fuzzed_{name}", REPO / "training" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.pop(0)


def base_argv(name: str, root: Path) -> list[str]:
    """The smallest valid command line of each script (shapes-teacher is embedded; nothing is loaded)."""
    run = ["--output_dir", str(root / "out"), "--max_train_steps", "5"]
    teacher = ["--pretrained_model_name_or_path", "shapes-teacher"]
    return {
        "train_teacher": run,
        "train_judge": run,
        "train_ppap_guides": [*run, "--task", "classification"],
        "train_ppap_experts": [*run, *teacher, "--guide_path", str(root / "guide"), "--shapesworld_prompts", "40"],
        "train_oms": [*run, *teacher],
        "train_rectified_flow": [*run, *teacher, "--pairs_dir", str(root / "pairs")],
        "train_snoopi": [*run, *teacher, "--shapesworld_prompts", "40"],
        "train_tiny_decoder": [*run, *teacher, "--dataset_name", "shapesworld"],
        "generate_reflow_pairs": [*teacher, "--output_dir", str(root / "out"), "--num_pairs", "4",
                                  "--shapesworld_prompts", "4"],
    }[name]


SCRIPTS = sorted(p.stem for p in (REPO / "training").glob("*.py") if "def parse_args" in p.read_text())


def script_parser(module, base: list[str]) -> argparse.ArgumentParser:
    """The parser a script's `parse_args` builds (recorded as it parses `base`), to read its flags and types."""
    parsers = []
    original = argparse.ArgumentParser.parse_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", recording):
        module.parse_args(base)
    return parsers[0]


def typed_flags(parser: argparse.ArgumentParser, kind) -> list[str]:
    """The single-valued flags whose type is `kind` (int or float)."""
    return sorted(
        action.dest
        for action in parser._actions
        if action.option_strings and action.type is kind and action.nargs is None and not action.choices
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("training-args")
    for folder in ("guide", "pairs", "data", "not-a-checkpoint", "out/checkpoint-2"):
        (root / folder).mkdir(parents=True)
    (root / "a-file").write_text("")
    return root


# ---- the cases ------------------------------------------------------------------------------------------------

NOT_AN_INT = st.sampled_from(["1.5", "ten", "", "1e3", "0x10", "nan", "2,0"])
NOT_A_NUMBER = st.sampled_from(["ten", "", "1,5", "one"])
NOT_FINITE = st.sampled_from(["nan", "inf", "-inf"])

COUNT_FLAGS = ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "checkpoints_total_limit",
               "validation_steps", "num_train_samples", "batch_size", "shard_size", "num_pairs")  # fmt: skip
NON_NEGATIVE_INT_FLAGS = ("seed", "dataloader_num_workers", "num_validation_images", "lr_warmup_steps")


def shared_cases(flags: set[str], root: Path) -> list[st.SearchStrategy]:
    """(kind, argv to append, the flag an error must name, expectation) for the flags this script has."""
    missing = str(root / "no-such-folder")
    cases = [
        st.sampled_from([("unknown flag", ["--no_such_flag", "1"], "no_such_flag", ERROR)]),
        st.sampled_from([str(root / "a-file"), str(root / "a-file" / "out")]).map(
            lambda o: ("output_dir: a file, or under one", ["--output_dir", o], "output_dir", ERROR)
        ),
    ]
    if "max_train_steps" in flags:
        cases += [
            st.integers(1, 20).map(lambda k: ("max_train_steps: positive", ["--max_train_steps", str(5 * k)],
                                              "max_train_steps", WORKS)),
            st.integers(-(10**9), 0).map(lambda v: ("max_train_steps: 0 or negative", ["--max_train_steps", str(v)],
                                                    "max_train_steps", ERROR)),
            NOT_AN_INT.map(lambda v: ("max_train_steps: not an integer", [f"--max_train_steps={v}"],
                                      "max_train_steps", ERROR)),
        ]
    for flag in COUNT_FLAGS:
        if flag in flags:
            cases += [
                st.integers(-(10**6), 0).map(lambda v, f=flag: (f"{f}: 0 or negative", [f"--{f}={v}"], f, ERROR)),
                NOT_AN_INT.map(lambda v, f=flag: (f"{f}: not an integer", [f"--{f}={v}"], f, ERROR)),
            ]
    for flag in NON_NEGATIVE_INT_FLAGS:
        if flag in flags:
            cases += [
                st.integers(0, 10**6).map(lambda v, f=flag: (f"{f}: >= 0", [f"--{f}={v}"], f, WORKS)),
                st.integers(-(10**6), -1).map(lambda v, f=flag: (f"{f}: negative", [f"--{f}={v}"], f, ERROR)),
            ]
    for flag in sorted(f for f in flags if f.endswith("learning_rate")):
        cases += [
            st.floats(1e-8, 1.0).map(lambda v, f=flag: (f"{f}: positive", [f"--{f}={v!r}"], f, WORKS)),
            st.floats(max_value=0.0).map(lambda v, f=flag: (f"{f}: 0 or negative", [f"--{f}={v!r}"], f, ERROR)),
            st.one_of(NOT_FINITE, NOT_A_NUMBER).map(lambda v, f=flag: (f"{f}: not a finite number", [f"--{f}={v}"],
                                                                      f, ERROR)),
        ]
    if "mixed_precision" in flags:
        cases += [
            st.sampled_from(["no", "fp16", "bf16"]).map(
                lambda v: ("mixed_precision: valid", ["--mixed_precision", v], "mixed_precision", WORKS)
            ),
            st.sampled_from(["fp8", "FP16", "", "float16", "yes"]).map(
                lambda v: ("mixed_precision: unknown", [f"--mixed_precision={v}"], "mixed_precision", ERROR)
            ),
        ]
    if "resume_from_checkpoint" in flags:
        cases += [
            st.sampled_from(["latest", "checkpoint-2", str(root / "out" / "checkpoint-2")]).map(
                lambda v: ("resume_from_checkpoint: latest or a checkpoint", ["--resume_from_checkpoint", v],
                           "resume_from_checkpoint", WORKS)
            ),
            st.sampled_from([missing, "checkpoint-99", str(root / "not-a-checkpoint"), "last", ""]).map(
                lambda v: ("resume_from_checkpoint: missing or not a checkpoint", [f"--resume_from_checkpoint={v}"],
                           "resume_from_checkpoint", ERROR)
            ),
        ]
    for flag in ("pairs_dir", "train_data_dir"):
        if flag in flags:
            cases.append(st.sampled_from([missing, str(root / "a-file")]).map(
                lambda v, f=flag: (f"{f}: missing or a file", [f"--{f}", v], f, ERROR)
            ))  # fmt: skip
    for flag in ("prompts_file", "negative_prompts_file"):
        if flag in flags:
            cases.append(st.just((f"{flag}: missing", [f"--{flag}", missing], flag, ERROR)))
    for flag in ("pretrained_model_name_or_path", "guide_path", "vae_from", "init_decoder"):
        if flag in flags:
            cases.append(st.sampled_from([missing, "./no-such-model", "~/no/such/model"]).map(
                lambda v, f=flag: (f"{f}: a local path that does not exist", [f"--{f}", v], f, ERROR)
            ))  # fmt: skip
    return cases


def typed_cases(parser: argparse.ArgumentParser) -> list[st.SearchStrategy]:
    """Every int flag of the script gets non-integers, every float flag NaN and infinity (argparse takes them)."""
    return [
        st.sampled_from(typed_flags(parser, int)).flatmap(
            lambda f: NOT_AN_INT.map(lambda v: ("any int flag: not an integer", [f"--{f}={v}"], f, ERROR))
        ),
        st.sampled_from(typed_flags(parser, float)).flatmap(
            lambda f: NOT_FINITE.map(lambda v: ("any float flag: NaN or inf", [f"--{f}={v}"], f, ERROR))
        ),
    ]


def outcome_of(module, argv: list[str], flag: str, expect: str, kind: str) -> str:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = module.parse_args(argv)
    except SystemExit as exit_info:
        assert expect == ERROR, f"{kind}: {argv} failed: {err.getvalue()[-500:]}"
        assert exit_info.code == 2 and flag in err.getvalue(), f"{kind}: {err.getvalue()} does not name {flag}"
        return "argparse exit 2"
    except ValueError as error:
        assert expect == ERROR, f"{kind}: {argv} raised {error!r}"
        assert flag in str(error), f"{kind}: {error!r} does not name {flag}"
        return "ValueError"
    assert expect == WORKS, f"{kind}: {argv} was accepted, expected an error naming {flag}"
    assert args is not None
    return "accepted"


@pytest.mark.parametrize("script", SCRIPTS)
def test_training_flags(script, root):
    module = load_script(script)
    base = base_argv(script, root)
    parser = script_parser(module, base)
    flags = {action.dest for action in parser._actions if action.option_strings}
    cases = st.one_of(*shared_cases(flags, root), *typed_cases(parser))

    @fuzz(150, script)
    @given(case=cases)
    def check(case):
        kind, extra, flag, expect = case
        OUTCOMES[(script, kind, outcome_of(module, [*base, *extra], flag, expect, kind))] += 1

    check()


def test_pairs_dir_without_pairs_stops_before_any_model_loads(root, monkeypatch):
    """An empty --pairs_dir ends in `main` before the teacher is loaded (loading would raise something else)."""
    module = load_script("train_rectified_flow")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(module.FastPipeline, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match="--pairs_dir"):
        module.main(base_argv("train_rectified_flow", root))
    OUTCOMES[("train_rectified_flow", "pairs_dir: a folder without pairs", "ValueError")] += 1
