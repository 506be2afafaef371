"""The scale-selection rule of the PPAP tables (benchmarks/choose_ppap_scales.py)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "choose_ppap_scales.py"
spec = importlib.util.spec_from_file_location("choose_ppap_scales", SCRIPT)
choose_ppap_scales = importlib.util.module_from_spec(spec)
spec.loader.exec_module(choose_ppap_scales)


def row(target_rate, colour=1.0, size=1.0):
    return {"target_rate": target_rate, "stated": {"colour": colour, "size": size}}


def sweep(scale, rows, method_scales=None):
    return {"scale": scale, "method_scales": method_scales or {}, "tasks": {"classification": rows}}


def test_best_target_rate_among_scales_that_keep_the_attributes():
    records = [
        sweep(1, {"no guidance": row(0.25), "PPAP": row(0.30), "naive": row(0.26)}, {"naive": 0.1}),
        sweep(3, {"PPAP": row(0.40, colour=0.98), "naive": row(0.35, colour=0.90)}, {"naive": 0.3}),
        sweep(9, {"PPAP": row(0.60, size=0.96)}),  # best rate, but size fell 4 points
    ]
    assert choose_ppap_scales.choose_scales(records, "classification") == {"PPAP": 3, "naive": 0.1}


def test_smallest_scale_when_every_scale_harms_an_attribute():
    records = [
        sweep(1, {"no guidance": row(0.25)}),
        sweep(5, {"PPAP": row(0.5, colour=0.5)}),
        sweep(2, {"PPAP": row(0.4, colour=0.9)}),
    ]
    assert choose_ppap_scales.choose_scales(records, "classification") == {"PPAP": 2}


def test_a_sweep_without_the_unguided_row_is_refused():
    with pytest.raises(ValueError, match="no guidance"):
        choose_ppap_scales.choose_scales([sweep(1, {"PPAP": row(0.4)})], "classification")
