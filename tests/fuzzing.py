"""What the fuzz test files share: bounded, deterministic hypothesis settings and the outcome report.

`FASTGEN_FUZZ_SCALE=N` multiplies every target's examples; `FASTGEN_FUZZ_REPORT=path.jsonl` appends each file's
outcome counts (target, class of input, outcome) when its tests end.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter

from hypothesis import HealthCheck, seed, settings

FUZZ_SCALE = int(os.environ.get("FASTGEN_FUZZ_SCALE", "1"))
WORKS, ERROR = "works", "error"


def fuzz(max_examples: int, target: str = ""):
    """Bounded, deterministic hypothesis settings: the same examples every run, a different sequence per target."""
    configured = settings(
        max_examples=max_examples * FUZZ_SCALE,
        deadline=None,
        derandomize=False,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    return lambda test: seed(zlib.crc32(f"{test.__qualname__}:{target}".encode()))(configured(test))


def write_outcomes(file_label: str, outcomes: Counter) -> None:
    """Append `outcomes` ((target, input class, outcome) -> count) to `FASTGEN_FUZZ_REPORT`, if it is set."""
    path = os.environ.get("FASTGEN_FUZZ_REPORT")
    if path:
        with open(path, "a") as report:
            for (target, kind, outcome), count in sorted(outcomes.items()):
                row = {"file": file_label, "target": target, "input": kind, "outcome": outcome, "count": count}
                report.write(json.dumps(row) + "\n")
