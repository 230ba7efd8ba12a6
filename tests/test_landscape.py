"""The loss-landscape tool on real checkpoints of the tiny model (SST-2)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest

pytest.importorskip("hydra")  # the GLUE app's tests need the [app] extra

import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint

from benchmarks.landscape import analyze, filter_normalized_direction, main
from lightning_deltasam.glue.app import build_components
from lightning_deltasam.glue.cli import CONF_DIR

from .glue_data import needs_glue

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["task=sst2", "model=tiny", "optimizer=sam", "data.batch_size=16", "data.limit_train=256"]

pytestmark = needs_glue


def test_filter_normalized_direction_matches_filter_norms():
    w = [torch.randn(4, 3), torch.randn(4)]
    d = filter_normalized_direction(w, torch.Generator().manual_seed(0))
    torch.testing.assert_close(d[0].norm(dim=1), w[0].norm(dim=1))
    assert torch.equal(d[1], torch.zeros(4))


def test_landscape_tool_on_two_checkpoints(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*OVERRIDES, f"paths.output_dir={tmp_path}"])
    _, datamodule, module, _ = build_components(cfg)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="s{step}")
    L.Trainer(
        max_steps=6,
        callbacks=[ckpt],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(module, datamodule=datamodule)
    paths = sorted(str(p) for p in tmp_path.glob("s*.ckpt"))
    assert len(paths) == 2
    out = tmp_path / "land"
    payload = main(
        [
            f"ckpt={','.join(paths)}",
            f"out={out}",
            "labels=early,late",
            "points=5",
            "batches=2",
            "directions=2",
            *OVERRIDES,
        ]
    )
    assert (tmp_path / "land.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "land.json").read_text())
    assert saved["sharpness"].keys() == {"early", "late"}
    for nums in payload["sharpness"].values():
        assert all(map(lambda v: v == v, nums.values()))  # finite, not NaN
        # to first order the gradient direction is the steepest: its rise beats random directions'
        assert nums["adversarial_rise"] > nums["random_rise"]
    sl = payload["slices"]["late"]
    assert len(sl["alphas"]) == 5 and sl["adversarial"][2] == pytest.approx(
        payload["sharpness"]["late"]["loss"], rel=1e-5
    )
    assert sl["radii"][-1] == pytest.approx(4 * 0.05) and sl["adversarial"][-1] > sl["adversarial"][2]


def test_analyze_restores_weights():
    from tests.helpers import MixinClassifier, make_loader

    module = MixinClassifier()
    before = [p.detach().clone() for p in module.parameters()]
    batches = [next(iter(make_loader()))]
    analyze(module, batches, rho=0.05, span=0.5, points=3, directions=1, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_landscape_help_prints_usage():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "landscape.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "ckpt=" in proc.stdout and "rho" in proc.stdout
