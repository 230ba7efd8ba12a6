"""The benchmark scripts run end to end on the tiny model and write the documented JSON interface."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (Path(os.environ["GLUE_DIR"]) / "SST-2" / "train.tsv").exists(), reason="needs GLUE_DIR")


@pytest.fixture(autouse=True)
def _bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def test_fidelity_interface(tmp_path):
    import fidelity

    out = tmp_path / "fid.json"
    fidelity.main(["--model", "tiny", "--batches", "1", "--batch-size", "8", "--train-steps", "6", "--probes", "2",
                   "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["default"] in result["rules"]
    for name in ("sam", "gram-exact", "gradnorm-exact", result["default"]):
        rule = result["rules"][name]
        assert set(rule) >= {"fidelity_mean", "fidelity_min", "beats_sam_frac"}
        assert -1.0 <= rule["fidelity_min"] <= rule["fidelity_mean"] <= 1.0
    assert result["rules"]["sam"]["beats_sam_frac"] == 0.0


def test_speed_interface(tmp_path):
    import speed

    out = tmp_path / "speed.json"
    speed.main(["--model", "tiny", "--steps", "1", "--batch-size", "8", "--probes", "2", "--scaling", "4",
                "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"adamw", "sam", "deltasam", "oracle"} <= set(result["step_seconds"])
    assert {"sam/adamw", "deltasam/sam"} <= set(result["ratios"])
    assert all(v > 0 for v in result["step_seconds"].values())
    assert result["batch_scaling"][0]["batch_size"] == 4
