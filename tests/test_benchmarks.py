"""The benchmark scripts run end to end on the tiny model and write the documented JSON interface."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
from pathlib import Path

import pytest

pytest.importorskip("hydra")  # the GLUE app's tests need the [app] extra

import torch

from .glue_data import needs_glue

ROOT = Path(__file__).resolve().parents[1]
pytestmark = needs_glue


@pytest.fixture(autouse=True)
def _bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def test_fidelity_interface(tmp_path):
    import fidelity

    out = tmp_path / "fid.json"
    fidelity.main(
        [
            "--model",
            "tiny",
            "--batches",
            "1",
            "--batch-size",
            "8",
            "--train-steps",
            "6",
            "--probes",
            "2",
            "--hindsight",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["default"] in result["rules"]
    for name in ("sam", "gram-exact", "gradnorm-exact", result["default"]):
        rule = result["rules"][name]
        assert set(rule) >= {"fidelity_mean", "fidelity_min", "beats_sam_frac"}
        assert -1.0 <= rule["fidelity_min"] <= rule["fidelity_mean"] <= 1.0
    assert result["rules"]["sam"]["beats_sam_frac"] == 0.0
    # the trainable exact rule forms the same K as the oracle's rows: the same fidelity
    exact, reference = result["rules"]["gram-linear-t4-exact"], result["rules"]["gram-exact"]
    assert exact["fidelity_mean"] == pytest.approx(reference["fidelity_mean"], abs=1e-4)
    assert {"gram-linear-t4-sketch-r8", "gram-exact-2ranks", "hindsight-ceiling"} <= set(result["rules"])


def test_speed_interface(tmp_path):
    import speed

    out = tmp_path / "speed.json"
    speed.main(["--model", "tiny", "--batch-size", "8", "--probes", "2", "--scaling", "4", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"adamw", "sam", "deltasam", "oracle"} <= set(result["step_seconds"])
    assert {"sam/adamw", "deltasam/sam"} <= set(result["ratios"])
    assert all(v > 0 for v in result["step_seconds"].values())
    assert result["batch_scaling"][0]["batch_size"] == 4


def test_speed_peers_interface(tmp_path):
    """Peers in the same run: pytorch_optimizer.SAM when installed (the [bench] extra), the minimal two-step SAM
    always; the engine's time per phase from its profiler ranges."""
    import speed

    out = tmp_path / "speed.json"
    speed.main(
        [
            "--model",
            "tiny",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--methods",
            "peers",
            "--scaling",
            "",
            "--oracle-repeats",
            "0",
            "--profile-steps",
            "1",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    peers = {"ref-sam"} | ({"pt-sam"} if not result["peers_skipped"] else set())
    assert set(result["peers_skipped"]) <= {"pt-sam"}
    assert {"adamw", "sam", "deltasam"} | peers <= set(result["step_seconds"])
    assert result["vs_peers"]["fastest_peer"] in peers
    for name in peers:
        row = result["vs_peers"][f"sam/{name}"]
        assert row["n"] == 2 and row["min"] <= row["median"] <= row["max"]
    assert set(speed.ENGINE_PHASES) <= set(result["engine_phase_ms"]["sam"])
    assert "oracle" not in result["step_seconds"]


def test_speed_isolated_processes(tmp_path):
    """--isolate: each method timed in its own process, rounds x steps samples per method, paired sample for sample (one round here)."""
    import speed

    out = tmp_path / "speed.json"
    speed.main(
        [
            "--model",
            "tiny",
            "--steps",
            "2",
            "--isolate",
            "1",
            "--batch-size",
            "8",
            "--methods",
            "peers",
            "--scaling",
            "",
            "--oracle-repeats",
            "0",
            "--profile-steps",
            "0",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["setup"]["repeats"] == 2 and "own process" in result["setup"]["timing"]
    row = result["vs_peers"]["sam/ref-sam"]
    assert row["n"] == 2 and row["median_ci95"][0] <= row["median"] <= row["median_ci95"][1]
    assert len(result["step_seconds_samples"]["sam"]) == 2
    assert all(v > 0 for v in result["step_seconds"].values())


def test_accuracy_interface(tmp_path):
    """Runs train.py per optimizer and seed, writes the documented JSON, table and plot; --reuse reads, never retrains."""
    import accuracy

    out, png, runs = tmp_path / "acc.json", tmp_path / "acc.png", tmp_path / "runs"
    record = tmp_path / "record"
    argv = [
        "--model",
        "tiny",
        "--optimizers",
        "adamw,deltasam",
        "--seeds",
        "1,2",
        "--runs-dir",
        str(runs),
        "--record",
        str(record),
        "--out",
        str(out),
        "--plot",
        str(png),
        "--",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_model_summary=false",
    ]
    result = accuracy.main(argv)
    assert json.loads(out.read_text()) == result
    assert (result["task"], result["model"], result["metric"]) == ("sst2", "tiny", "val/acc")
    assert set(result["optimizers"]) == {"adamw", "deltasam"}
    for o in result["optimizers"].values():
        assert set(o["seeds"]) == {"1", "2"} and o["steps"] == 4 and o["wall_s"] > 0
        values = list(o["seeds"].values())
        assert o["mean"] == pytest.approx(sum(values) / 2) and o["std"] >= 0
    assert result["overrides"][0] == "trainer.max_steps=4"
    losses = result["train_loss_by_epoch"]["adamw"]["1"]  # 4 steps of one epoch, logged every step
    assert len(losses) == 1 and 0 < losses[0] < 10
    assert "| adamw |" in out.with_suffix(".md").read_text() and png.stat().st_size > 0
    # identical data order and initialization per seed: the first logged training loss agrees across optimizers
    first_loss = {}
    for run_dir in runs.iterdir():
        assert run_dir.name.endswith(("seed1", "seed2")) and "max-steps4" in run_dir.name
        with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
            loss = next(float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"])
        first_loss.setdefault(run_dir.name.rsplit("-", 1)[1], []).append(loss)
    assert all(len(v) == 2 and v[0] == pytest.approx(v[1], abs=1e-6) for v in first_loss.values()), first_loss
    # --reuse reads the finished runs back (same numbers) instead of training them again
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("results.json")}
    again = accuracy.main([*argv[: argv.index("--")], "--reuse", *argv[argv.index("--") :]])
    assert again["optimizers"] == result["optimizers"]
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("results.json")} == stamps
    # the record (results.json + CSV, no checkpoints) lets a fresh clone reuse the runs: same numbers and curves, no training
    assert sorted(p.name for p in record.iterdir()) == sorted(p.name for p in runs.iterdir())
    assert not list(record.rglob("*.ckpt")) and len(list(record.rglob("metrics.csv"))) == 4
    shutil.rmtree(runs)
    from_record = accuracy.main([*argv[: argv.index("--")], "--reuse", *argv[argv.index("--") :]])
    assert from_record["optimizers"] == result["optimizers"] and not runs.exists()


def test_accuracy_jobs_trains_runs_at_once_on_split_threads(tmp_path, monkeypatch):
    """--jobs 2 trains two runs concurrently, each on cpu_count // 2 threads, and reports them in plan order."""
    import threading
    import time

    import accuracy

    real_run, calls, lock = accuracy.subprocess.run, [], threading.Lock()

    def spy(cmd, **kwargs):
        start = time.monotonic()
        proc = real_run(cmd, **kwargs)
        with lock:
            calls.append(
                (
                    start,
                    time.monotonic(),
                    kwargs["env"].get("OMP_NUM_THREADS"),
                    next(a for a in cmd if a.startswith("optimizer=")),
                )
            )
        return proc

    monkeypatch.setattr(accuracy.subprocess, "run", spy)
    out = tmp_path / "acc.json"
    argv = [
        "--task",
        "mrpc",
        "--model",
        "tiny",
        "--optimizers",
        "adamw,sam",
        "--seeds",
        "1",
        "--jobs",
        "2",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--record",
        "",
        "--out",
        str(out),
        "--",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_model_summary=false",
    ]
    result = accuracy.main(argv)
    assert list(result["optimizers"]) == ["adamw", "sam"] and result["jobs"] == 2
    assert all(set(o["seeds"]) == {"1"} and o["steps"] == 3 for o in result["optimizers"].values())
    # MRPC's verdict metric is F1; its accuracy is summarized beside it from the same runs, with its own standard error
    assert result["metric"] == "val/f1" and list(result["also"]) == ["val/acc"]
    acc = result["also"]["val/acc"]
    assert set(acc["optimizers"]) == {"adamw", "sam"} and 0 <= acc["optimizers"]["sam"]["seeds"]["1"] <= 1
    assert acc["one_run_se"] == pytest.approx(
        accuracy.one_run_se(
            "val/acc", statistics.fmean(o["mean"] for o in acc["optimizers"].values()), result["dev_examples"]
        )
    )
    assert "Also measured, val/acc" in out.with_suffix(".md").read_text()
    assert sorted(c[3] for c in calls) == ["optimizer=adamw", "optimizer=sam"]
    assert {c[2] for c in calls} == {str(max(1, (os.cpu_count() or 1) // 2))}
    (s1, e1, *_), (s2, e2, *_) = sorted(calls)
    assert s2 < e1, "the two runs did not overlap"
    with pytest.raises(SystemExit):
        accuracy.main(["--jobs", "0", "--out", str(out)])


def test_accuracy_run_names_carry_the_overrides():
    import accuracy

    assert accuracy.run_name("sst2", "minilm", "sam", 1, []) == "sst2-minilm-sam-seed1"
    assert (
        accuracy.run_name("sst2", "minilm", "deltasam", 2, ["optimizer.rho=0.1", "optimizer.reweight.temperature=1.0"])
        == "sst2-minilm-deltasam-rho0.1-temperature1.0-seed2"
    )


def test_accuracy_summary_pairs_seeds_against_adamw_and_sam():
    import accuracy

    def run(value):
        return {"val/acc": value, "wall_seconds": 10.0, "steps": 4}

    runs = {
        "adamw": {1: run(0.88), 2: run(0.86), 3: run(0.87)},
        "sam": {1: run(0.89), 2: run(0.85), 3: run(0.90)},
        "deltasam": {1: run(0.90), 2: run(0.85), 3: run(0.89)},
    }
    summary = accuracy.summarize(runs, "val/acc")
    assert summary["sam"]["mean"] == pytest.approx(0.88) and summary["sam"]["std"] == pytest.approx(0.02645751)
    assert summary["sam"]["paired"] == {"baseline": "adamw", "mean_diff": pytest.approx(0.01), "wins": 2, "losses": 1}
    # against SAM: +0.01, 0, -0.01 -> one win, one tie, one loss
    assert summary["deltasam"]["paired_vs"]["sam"] == {"mean_diff": pytest.approx(0.0), "n": 3, "wins": 1, "losses": 1}
    table = accuracy.markdown(
        {
            "optimizers": summary,
            "metric": "val/acc",
            "dev_examples": 872,
            "one_run_se": accuracy.one_run_se("val/acc", 0.88, 872),
        }
    )
    assert "| sam | 0.8900 | 0.8500 | 0.9000 | **0.8800** | 0.0265 | +1.00, 2-1 | - | 10 |" in table
    assert "| deltasam | 0.9000 | 0.8500 | 0.8900 | **0.8800** | 0.0265 | +1.00, 2-1 | +0.00, 1-1 | 10 |" in table
    assert "(n = 872): 1.10 points" in table and "Also measured" not in table
    f1 = {o: {s: {**r, "val/f1": r["val/acc"] - 0.1} for s, r in by_seed.items()} for o, by_seed in runs.items()}
    also = accuracy.also_measured(f1, "val/acc", 872)
    assert list(also) == ["val/f1"] and also["val/f1"]["optimizers"]["sam"]["mean"] == pytest.approx(0.78)
    assert also["val/f1"]["one_run_se"] == pytest.approx(accuracy.one_run_se("val/f1", (0.77 + 0.78 + 0.78) / 3, 872))
    table = accuracy.markdown(
        {"optimizers": summary, "metric": "val/acc", "dev_examples": 872, "one_run_se": None, "also": also}
    )
    assert "Also measured, val/f1 (same runs; standard error of one run 1.41 points):" in table
    assert "| sam | 0.7900 | 0.7500 | 0.8000 | **0.7800** | 0.0265 | +1.00, 2-1 | - | 10 |" in table
    # per-instance SAM (m = 1) is a third baseline when run; an m = 4 column is not
    runs["instance_sam@m=4"] = {1: run(0.90), 2: run(0.86), 3: run(0.88)}
    runs["instance_sam@rho=0.01"] = {1: run(0.91), 2: run(0.84), 3: run(0.88)}
    summary = accuracy.summarize(runs, "val/acc")
    assert list(summary["deltasam"]["paired_vs"]) == ["adamw", "sam", "instance_sam@rho=0.01"]
    assert summary["deltasam"]["paired_vs"]["instance_sam@rho=0.01"] == {
        "mean_diff": pytest.approx(0.01 / 3),
        "n": 3,
        "wins": 2,
        "losses": 1,
    }


def test_one_run_standard_error():
    import accuracy

    assert accuracy.one_run_se("val/acc", 0.5, 100) == pytest.approx(0.05)
    assert accuracy.one_run_se("val/mcc", 0.5, 1043) == pytest.approx(0.75 / 1040**0.5)
    assert accuracy.one_run_se("val/pearson", 0.0, 103) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="loss"):
        accuracy.one_run_se("val/loss", 0.5, 100)


def test_accuracy_curve_keeps_one_point_per_validation(tmp_path):
    import accuracy

    log = tmp_path / "csv" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text("epoch,step,train/loss,val/acc\n0,9,0.7,\n0,99,,0.80\n0,199,,0.85\n0,200,,0.85\n")
    assert accuracy.read_curve(tmp_path, "val/acc") == [(99, 0.80), (200, 0.85)]


def test_speed_gram_methods_and_fixed_length(tmp_path):
    import speed

    out = tmp_path / "speed-gram.json"
    speed.main(
        [
            "--model",
            "tiny",
            "--steps",
            "1",
            "--batch-size",
            "8",
            "--methods",
            "gram",
            "--probes",
            "",
            "--scaling",
            "",
            "--oracle-repeats",
            "0",
            "--profile-steps",
            "0",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert {
        "gram-linear-t4-exact",
        "gram-linear-t4-sketch-r8",
        "gram-linear-t4-sketch-r32",
        "gram-linear-t4-sketch-r128",
    } <= set(result["step_seconds"])
    assert "gram-linear-t4-exact/sam" in result["ratios"] and not result["vs_peers"]
    batch = {
        "input_ids": torch.ones(2, 5, dtype=torch.long),
        "attention_mask": torch.ones(2, 5, dtype=torch.long),
        "labels": torch.zeros(2, dtype=torch.long),
    }
    longer, shorter = speed._fixed_length(batch, 8), speed._fixed_length(batch, 3)
    assert longer["input_ids"].shape == (2, 8) and int(longer["attention_mask"].sum()) == 10
    assert shorter["attention_mask"].shape == (2, 3) and longer["labels"].shape == (2,)


def test_speed_instance_interface(tmp_path):
    """--methods instance: per-instance SAM (m = 1) and m-sharpness (m = 4, 8) timed against SAM and the loop oracle."""
    import speed

    out = tmp_path / "speed.json"
    speed.main(
        [
            "--model",
            "tiny",
            "--steps",
            "1",
            "--batch-size",
            "8",
            "--methods",
            "instance",
            "--probes",
            "",
            "--scaling",
            "",
            "--profile-steps",
            "0",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert {"adamw", "sam", "instance-m1", "instance-m4", "instance-m8", "oracle"} <= set(result["step_seconds"])
    assert {"instance-m1/sam", "instance-m4/sam", "oracle/sam"} <= set(result["ratios"])


def test_speed_variants_interface(tmp_path):
    """--methods variants: GSAM, WSAM, LookSAM, FriendlySAM and every-k SAM timed against SAM and AdamW in one run."""
    import speed

    out = tmp_path / "speed.json"
    speed.main(
        [
            "--model",
            "tiny",
            "--steps",
            "20",
            "--batch-size",
            "8",
            "--methods",
            "variants",
            "--probes",
            "",
            "--scaling",
            "",
            "--profile-steps",
            "0",
            "--oracle-repeats",
            "0",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    names = {"gsam", "wsam", "looksam", "friendly", "sam-every2", "sam-every4"}
    assert names | {"adamw", "sam"} <= set(result["step_seconds"])
    assert {f"{n}/sam" for n in names} | {f"{n}/adamw" for n in names} <= set(result["ratios"])
    # an intermittent variant costs its mean over whole periods (LookSAM: 2 SAM steps of 20), not its median step
    mean, samples = result["step_seconds_mean"], result["step_seconds_samples"]
    assert len(samples["looksam"]) == 20
    assert result["ratios"]["looksam/adamw"] == pytest.approx(mean["looksam"] / mean["adamw"])
    assert mean["looksam"] == pytest.approx(sum(samples["looksam"]) / 20, rel=1e-3)


def test_speed_refuses_partial_periods(tmp_path):
    """Timing LookSAM (k = 10) or every-4 SAM over part of a period would misstate its average step."""
    import speed

    with pytest.raises(SystemExit):
        speed.main(["--model", "tiny", "--steps", "6", "--methods", "variants", "--out", str(tmp_path / "s.json")])


def test_accuracy_per_optimizer_overrides_and_holdout(tmp_path):
    """``sam@optimizer.rho=0.1`` is a column of its own, paired against the same SAM run; ``data.holdout`` validates
    on held-out training rows (the run records it, and the table says so)."""
    import accuracy

    assert accuracy.parse_optimizer("instance_sam@optimizer.rho=0.02@optimizer.m=4") == (
        "instance_sam@rho=0.02@m=4",
        "instance_sam",
        ["optimizer.rho=0.02", "optimizer.m=4"],
    )
    with pytest.raises(ValueError, match="not key=value"):
        accuracy.parse_optimizer("sam@rho")
    out = tmp_path / "acc.json"
    argv = [
        "--model",
        "tiny",
        "--optimizers",
        "sam,sam@optimizer.rho=0.2",
        "--seeds",
        "1",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--record",
        "",
        "--out",
        str(out),
        "--",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_model_summary=false",
        "data.limit_train=200",
        "data.holdout=0.1",
    ]
    result = accuracy.main(argv)
    assert list(result["optimizers"]) == ["sam", "sam@rho=0.2"]
    assert result["options"]["sam"]["rho"] == 0.05 and result["options"]["sam@rho=0.2"]["rho"] == 0.2
    assert result["optimizers"]["sam@rho=0.2"]["paired_vs"]["sam"]["n"] == 1
    assert result["holdout"] == 0.1 and result["dev_examples"] == 20  # 10% of the 200 training rows, not the dev set
    assert "held-out training rows' size (n = 20)" in out.with_suffix(".md").read_text()
    assert len(list((tmp_path / "runs").iterdir())) == 2  # one run directory each: --reuse never mixes them up


def test_loss_rise_pairs_each_optimizer_with_sam_of_its_setting_and_seed(tmp_path):
    """loss_rise.py averages each run's logged deltasam/loss_rise and divides by SAM's on the same setting and seed."""
    import loss_rise

    def record(name: str, rises: list[float], ratio: float | None = None) -> None:
        path = tmp_path / name / "csv" / "version_0" / "metrics.csv"
        path.parent.mkdir(parents=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "deltasam/loss_rise", "deltasam/grad_norm_ratio", "train/loss"])
            for step, rise in enumerate(rises):
                writer.writerow([step, rise, "" if ratio is None else ratio, 0.5])

    record("cola-minilm-sam-max-epochs3-seed1", [0.02, 0.04])
    record("cola-minilm-deltasam_exact-max-epochs3-seed1", [0.015, 0.015])
    record("cola-minilm-instance_sam-max-epochs3-seed1", [0.09, 0.11], ratio=3.0)
    record("cola-minilm-adamw-max-epochs3-seed1", [])
    record("cola-minilm-instance_sam-max-epochs3-match-rhotrue-rho0.05-seed1", [0.03, 0.03], ratio=4.0)
    record("cola-minilm-instance_sam-max-epochs3-match-rhotrue-rho0.02-seed1", [0.03, 0.03], ratio=4.0)
    result = loss_rise.main(["--runs", str(tmp_path)])
    # match_rho at SAM's default rho pairs with the plain SAM runs; at another rho with SAM at that rho (none here)
    assert result["cola-minilm-max-epochs3-match-rhotrue-rho0.05"]["instance_sam"]["vs_sam"]["mean"] == pytest.approx(
        1.0
    )
    assert "vs_sam" not in result["cola-minilm-max-epochs3-match-rhotrue-rho0.02"]["instance_sam"]
    assert loss_rise.sam_setting("cola-minilm-x-rho0.02-match-rhotrue") == "cola-minilm-x-rho0.02"
    rows = result["cola-minilm-max-epochs3"]
    assert set(rows) == {"sam", "deltasam_exact", "instance_sam"}  # AdamW logs no loss rise
    assert rows["deltasam_exact"]["vs_sam"]["mean"] == pytest.approx(0.5)
    assert (
        rows["instance_sam"]["vs_sam"]["mean"] == pytest.approx(10 / 3)
        and rows["instance_sam"]["grad_norm_ratio"] == 3.0
    )


def test_pooled_view_pairs_each_column_with_sam_and_gives_delta_sams_share(tmp_path):
    """pooled.py: per setting m1 - SAM and delta - SAM (paired by seed, points), the share (delta - SAM)/(m1 - SAM),
    and the sign counts over every setting and seed."""
    import pooled

    def setting(metric, sam, m1, delta, exact):
        cols = {"adamw": [0.5] * 3, "sam": sam, "deltasam": delta, "deltasam_exact": exact}
        cols["instance_sam@rho=0.01"], cols["instance_sam@rho=0.01@m=4"] = m1, [0.0] * 3
        return {
            "metric": metric,
            "optimizers": {k: {"seeds": {str(i + 1): x for i, x in enumerate(v)}} for k, v in cols.items()},
        }

    a = tmp_path / "a.json"
    a.write_text(
        json.dumps(setting("val/acc", [0.80, 0.79, 0.80], [0.82, 0.80, 0.81], [0.81, 0.79, 0.805], [0.79] * 3))
    )
    b = tmp_path / "b.json"
    b.write_text(json.dumps(setting("val/mcc", [0.20, 0.21, 0.22], [0.19, 0.21, 0.20], [0.22, 0.23, 0.22], [0.2] * 3)))
    out = tmp_path / "pooled.json"
    result = pooled.main([f"noisy={a}", f"cola={b}", "--out", str(out)])
    noisy = result["settings"]["noisy"]
    assert noisy["instance"] == "instance_sam@rho=0.01"
    assert noisy["vs_sam"]["instance_sam@rho=0.01"]["mean"] == pytest.approx(4 / 3)
    assert noisy["vs_sam"]["deltasam"]["diffs"] == pytest.approx([1.0, 0.0, 0.5])
    assert noisy["share"]["deltasam"] == pytest.approx(0.5 / (4 / 3))
    assert result["pooled"]["instance"] == {
        "settings": 2,
        "mean_of_setting_means": pytest.approx((4 / 3 - 1) / 2),
        "wins": 3,
        "losses": 2,
        "settings_ahead": 1,
    }
    assert result["pooled"]["deltasam"]["wins"] == 4 and result["pooled"]["deltasam"]["losses"] == 0
    assert "| noisy | val/acc | instance_sam@rho=0.01 | +1.33, 3-0 |" in out.with_suffix(".md").read_text()


def test_frontier_table_costs_gains_and_target(tmp_path):
    """frontier.py: each column's cost is its mean step over AdamW's in the first speed file that timed it, its
    gain the paired difference from AdamW; the target needs cost <= 1.3x and, in 2 settings, within 0.5 of SAM
    with 2 of 3 wins over AdamW."""
    import frontier

    speed_a = {
        "step_seconds": {"adamw": 1.0, "sam": 2.0, "looksam": 1.0, "deltasam": 2.0},
        "step_seconds_mean": {"adamw": 1.0, "sam": 2.0, "looksam": 1.2, "gradnorm-softmax-t4-K8-head": 2.1},
        "peak_memory": {"adamw": {"peak_mb": 100.0}, "looksam": {"peak_mb": 150.0}},
    }
    speed_b = {"step_seconds": {"adamw": 2.0, "looksam": 9.0, "msam": 2.2}}
    (tmp_path / "a.json").write_text(json.dumps(speed_a))
    (tmp_path / "b.json").write_text(json.dumps(speed_b))

    def setting(file, cols):
        record = {
            "metric": "val/acc",
            "optimizers": {
                k: {"seeds": {str(i + 1): x for i, x in enumerate(v)}, "mean": statistics.fmean(v)}
                for k, v in cols.items()
            },
        }
        (tmp_path / file).write_text(json.dumps(record))
        return str(tmp_path / file)

    base = {"adamw": [0.70, 0.70, 0.70], "sam": [0.75, 0.75, 0.75]}
    s1 = setting("s1.json", {**base, "looksam@rho=0.1": [0.748, 0.75, 0.742], "msam@rho=0.2": [0.72, 0.69, 0.72]})
    s2 = setting("s2.json", {**base, "looksam@rho=0.1": [0.76, 0.745, 0.75]})
    s3 = setting("s3.json", {**base, "looksam@rho=0.1": [0.70, 0.69, 0.60]})
    out = tmp_path / "frontier"
    result = frontier.main(
        ["--speed", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}", "--out", str(out)]
        + [f"--setting={n}={f}" for n, f in (("one", s1), ("two", s2), ("three", s3))]
    )
    assert result["costs"]["looksam"] == {"step": pytest.approx(1.2), "memory": pytest.approx(1.5), "file": "a.json"}
    assert result["costs"]["msam"]["step"] == pytest.approx(1.1) and result["costs"]["deltasam"]["step"] == 2.1
    row = result["settings"]["one"]["rows"]["looksam@rho=0.1"]
    assert row["gain"] == pytest.approx((4.8 + 5.0 + 4.2) / 3) and row["wins"] == 3
    assert row["gain_range"] == pytest.approx([4.2, 5.0]) and row["vs_sam"] == pytest.approx(-1 / 3 * 1.0, abs=1e-9)
    target = result["target"]["looksam@rho=0.1"]
    assert target["settings_met"] == ["one", "two"] and target["met"]  # two: +0.17 vs SAM, 3 of 3 wins
    assert not result["target"]["msam@rho=0.2"]["met"]  # one setting run, 1.5 points behind SAM
    table = out.with_suffix(".md").read_text()
    assert "| looksam@rho=0.1 | 1.20 | 1.50 | 0.7467, +4.67 (3/3), -0.33 |" in table
    assert "| msam@rho=0.2 | 1.10 | - | 0.7100, +1.00 (2/3), -4.00 | not run | not run | not met (0 of 3) |" in table
    assert out.with_suffix(".png").stat().st_size > 0
