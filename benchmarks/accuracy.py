"""Accuracy of AdamW, SAM and delta-SAM over seeds, one fixed budget, identical data order per seed.

Each run is the training app itself (``python train.py ...``), so the figures are what users get:

    python benchmarks/accuracy.py --model minilm --seeds 1,2,3 --out benchmarks/results/accuracy-sst2-minilm.json \
        --plot benchmarks/results/accuracy-sst2-minilm.png

Writes the JSON (per optimizer: final metric per seed, mean, std, mean wall seconds; the task's other
dev metrics, e.g. STS-B's Spearman, under ``also``), a Markdown table next to it, and with ``--plot``
the validation metric vs step (mean and min-max band over seeds). Extra ``key=value`` arguments after
``--`` are passed to every run (e.g. trainer.max_steps=400).
An optimizer may carry its own overrides after ``@`` (``--optimizers adamw,sam,sam@optimizer.rho=0.1,
instance_sam@optimizer.rho=0.02``): each is a column of its own, paired against the same AdamW and SAM runs.
``--jobs J`` trains J runs at once, each on cpu_count // J threads: on a small CPU that finishes a
plan sooner (one thread per run wastes less on synchronization), and each run's wall time is then
that of a shared machine.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_one(
    task: str,
    model: str,
    optimizer: str,
    seed: int,
    run_dir: Path,
    extra: list[str],
    reuse: bool = False,
    record: Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """One ``train.py`` run; returns its results.json plus the validation curve from the CSV log.

    With ``reuse``, a finished run of the same command is read instead of trained again: from the run
    directory, else from ``record`` (the committed copy, so a fresh clone picks up where a session stopped).
    A finished run's results.json and CSV log are copied to ``record / run_dir.name``. ``threads`` sets the
    run's OMP_NUM_THREADS (None: the environment's).
    """
    sources = [run_dir, *([record / run_dir.name] if record is not None else [])] if reuse else []
    for source in sources:
        if (source / "results.json").is_file():
            results = json.loads((source / "results.json").read_text())
            results["curve"] = read_curve(source, results["main_metric"])
            results["train_loss_by_epoch"] = train_loss_by_epoch(source)
            if record is not None:
                save_record(source, record / run_dir.name)
            return results
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"task={task}",
        f"model={model}",
        f"optimizer={optimizer}",
        f"seed={seed}",
        f"hydra.run.dir={run_dir}",
        "trainer.enable_progress_bar=false",
        *extra,
    ]
    t0 = time.perf_counter()
    env = dict(os.environ)  # the runs read GLUE_DIR, as the app does
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    results["curve"] = read_curve(run_dir, results["main_metric"])
    results["train_loss_by_epoch"] = train_loss_by_epoch(run_dir)
    results["bench_wall_s"] = time.perf_counter() - t0
    if record is not None:
        save_record(run_dir, record / run_dir.name)
    return results


def parse_optimizer(entry: str) -> tuple[str, str, list[str]]:
    """``"sam@optimizer.rho=0.1"`` -> (label ``"sam@rho=0.1"``, config name ``"sam"``, overrides ``["optimizer.rho=0.1"]``)."""
    name, *overrides = entry.split("@")
    for override in overrides:
        if "=" not in override:
            raise ValueError(
                f"--optimizers entry {entry!r}: {override!r} is not key=value (e.g. sam@optimizer.rho=0.1)."
            )
    label = "@".join([name, *(f"{o.split('=', 1)[0].rsplit('.', 1)[-1]}={o.split('=', 1)[1]}" for o in overrides)])
    return label, name, overrides


def dev_size(task: str, metric: str) -> int | None:
    """Rows of ``task``'s dev split that ``metric`` is measured on (for runs whose results.json predates ``dev_examples``)."""
    if str(ROOT) not in sys.path:  # run as a script from a checkout that is not installed
        sys.path.insert(0, str(ROOT))
    from lightning_deltasam.glue.tasks import glue_task

    try:
        t = glue_task(task, os.environ.get("GLUE_DIR", "data/glue"))  # the app's default
        return len(t.load(metric.split("/", 1)[0]))
    except (ValueError, OSError, KeyError):
        return None


def save_record(run_dir: Path, dest: Path) -> None:
    """The small files of a finished run (results.json, the CSV metrics) copied to ``dest`` (no checkpoints)."""
    if run_dir.resolve() == dest.resolve():
        return
    files = [run_dir / "results.json", *sorted(run_dir.glob("csv/**/metrics.csv"))]
    for path in files:
        target = dest / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def run_name(task: str, model: str, optimizer: str, seed: int, extra: list[str]) -> str:
    """Run directory name; overrides are part of it so ``--reuse`` never reads a run of other settings.

    ``['optimizer.rho=0.1']`` gives ``sst2-minilm-sam-rho0.1-seed1``; no overrides keep the plain name.
    """
    tags = []
    for override in extra:
        key, _, value = override.lstrip("+~").partition("=")
        tags.append(f"{key.rsplit('.', 1)[-1]}{value}")
    tag = "".join(c if c.isalnum() or c in ".-" else "-" for c in "-".join(tags))
    if len(tag) > 80:  # keep directory names short; the hash still tells settings apart
        tag = f"{tag[:64]}-{hashlib.sha1(' '.join(extra).encode()).hexdigest()[:10]}"
    return "-".join([task, model, optimizer, *([tag] if tag else []), f"seed{seed}"])


def read_curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of ``metric`` from the run's CSV logger."""
    points = []
    for path in sorted(run_dir.glob("csv/**/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(metric):
                    points.append((int(row["step"]), float(row[metric])))
    # the app's final validation of the last weights is logged one step after the periodic one of the same
    # weights (same value): keep one point per validation
    return [
        p
        for i, p in enumerate(points)
        if not (i + 1 < len(points) and points[i + 1][0] == p[0] + 1 and points[i + 1][1] == p[1])
    ]


def train_loss_by_epoch(run_dir: Path) -> list[float]:
    """Mean logged training loss per epoch (the loss at w, on the labels trained on: with ``data.label_noise``
    a loss below the noise floor means the flipped labels are being fitted)."""
    per_epoch: dict[int, list[float]] = {}
    for path in sorted(run_dir.glob("csv/**/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss") and row.get("epoch"):
                    per_epoch.setdefault(int(float(row["epoch"])), []).append(float(row["train/loss"]))
    return [statistics.fmean(per_epoch[e]) for e in sorted(per_epoch)]


def per_instance_column(labels: Any) -> str | None:
    """The first per-instance SAM column with m = 1 (``instance_sam`` or ``instance_sam@rho=...``), if any."""
    return next((o for o in labels if o.split("@")[0] == "instance_sam" and "@m=" not in o), None)


def summarize(runs: dict[str, dict[int, dict[str, Any]]], metric: str) -> dict[str, Any]:
    """Per optimizer: the metric per seed, mean, std, mean wall seconds, and ``paired`` against each baseline
    (the first optimizer, ``sam`` and the first per-instance SAM column with m = 1, when run): mean per-seed difference
    and wins-losses on the shared seeds."""
    out = {}
    for opt, by_seed in runs.items():
        values = [r[metric] for r in by_seed.values()]
        out[opt] = {
            "seeds": {str(s): r[metric] for s, r in by_seed.items()},
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "wall_s": statistics.fmean(r["wall_seconds"] for r in by_seed.values()),
            "steps": next(iter(by_seed.values()))["steps"],
        }
    per_instance = per_instance_column(runs)
    baselines = list(
        dict.fromkeys(
            [next(iter(runs)), *(["sam"] if "sam" in runs else []), *([per_instance] if per_instance else [])]
        )
    )
    for opt, by_seed in runs.items():  # paired by seed: same data order and initialization, so seed noise cancels
        out[opt]["paired_vs"] = {}
        for base in baselines:
            diffs = [by_seed[s][metric] - runs[base][s][metric] for s in by_seed if s in runs[base]]
            if diffs:
                out[opt]["paired_vs"][base] = {
                    "mean_diff": statistics.fmean(diffs),
                    "n": len(diffs),
                    "wins": sum(d > 0 for d in diffs),
                    "losses": sum(d < 0 for d in diffs),
                }
        first = out[opt]["paired_vs"][baselines[0]]
        out[opt]["paired"] = {"baseline": baselines[0], **{k: first[k] for k in ("mean_diff", "wins", "losses")}}
    return out


PROPORTIONS, CORRELATIONS = ("acc", "f1"), ("mcc", "pearson", "spearman")  # the metrics one_run_se has a formula for


def one_run_se(metric: str, value: float, n: int) -> float:
    """Standard error of one run's dev metric from the dev set's size alone (sampling noise of the dev set):
    binomial sqrt(p(1-p)/n) for accuracy and F1 (F1: an approximation), (1-r^2)/sqrt(n-3) for a correlation
    (MCC, Pearson, Spearman; the delta method on Fisher's z)."""
    name = metric.rsplit("/", 1)[-1]
    if name in PROPORTIONS:
        return math.sqrt(max(value * (1 - value), 0.0) / n)
    if name in CORRELATIONS:
        return (1 - value**2) / math.sqrt(max(n - 3, 1))
    raise ValueError(f"no standard error formula for metric {metric!r}")


def also_measured(runs: dict[str, dict[int, dict[str, Any]]], metric: str, n_dev: int | None) -> dict[str, Any]:
    """The summary of every other dev metric all runs report (MRPC's accuracy, STS-B's Spearman), with its
    one-run standard error where there is a formula; reported beside ``metric``, which the verdicts rest on."""
    finished = [r for by_seed in runs.values() for r in by_seed.values()]
    names = sorted(k for k in finished[0] if k.startswith("val/") and k not in (metric, "val/loss"))
    out = {}
    for name in (n for n in names if all(n in r for r in finished)):
        summary = summarize(runs, name)
        mean = statistics.fmean(o["mean"] for o in summary.values())
        known = name.rsplit("/", 1)[-1] in PROPORTIONS + CORRELATIONS
        out[name] = {"optimizers": summary, "one_run_se": one_run_se(name, mean, n_dev) if n_dev and known else None}
    return out


def table(optimizers: dict[str, Any]) -> list[str]:
    """Markdown rows of one metric's summary: per-seed values, mean, std, paired deltas vs each baseline, wall time."""
    seeds = sorted({s for o in optimizers.values() for s in o["seeds"]}, key=int)
    baselines = list(next(iter(optimizers.values())).get("paired_vs", {}))
    head = "".join(f" vs {b}: mean Δ (points), wins-losses |" for b in baselines)
    lines = [
        f"| optimizer | {' | '.join(f'seed {s}' for s in seeds)} | mean | std |{head} wall s/run |",
        "|---|" + "---|" * (len(seeds) + 3 + len(baselines)),
    ]
    for name, o in optimizers.items():
        cells = " | ".join(f"{o['seeds'][s]:.4f}" if s in o["seeds"] else "-" for s in seeds)
        vs = "".join(
            " - |"
            if name == b or b not in o["paired_vs"]
            else f" {100 * o['paired_vs'][b]['mean_diff']:+.2f}, {o['paired_vs'][b]['wins']}-{o['paired_vs'][b]['losses']} |"
            for b in baselines
        )
        lines.append(f"| {name} | {cells} | **{o['mean']:.4f}** | {o['std']:.4f} |{vs} {o['wall_s']:.0f} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The main metric's table and its one-run standard error, then a table per other dev metric (``also``)."""
    lines = table(result["optimizers"])
    se = result.get("one_run_se")
    if se is not None:
        where = "held-out training rows'" if result.get("holdout") else "dev set's"
        lines.append(
            f"\nStandard error of one run's {result['metric']} from the {where} size (n = {result['dev_examples']}): "
            f"{100 * se:.2f} points."
        )
    for metric, also in result.get("also", {}).items():
        se = also.get("one_run_se")
        note = "same runs" if se is None else f"same runs; standard error of one run {100 * se:.2f} points"
        lines += [f"\nAlso measured, {metric} ({note}):\n", *table(also["optimizers"])]
    return "\n".join(lines)


def plot(curves: dict[str, dict[int, list[tuple[int, float]]]], metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, by_seed in curves.items():
        steps = sorted(set.intersection(*(set(s for s, _ in c) for c in by_seed.values())))
        if not steps:
            continue
        table = [[dict(c)[s] for s in steps] for c in by_seed.values()]
        mean = [statistics.fmean(col) for col in zip(*table)]
        ax.plot(steps, mean, marker="o", label=f"{name} (n={len(table)})")
        ax.fill_between(steps, [min(c) for c in zip(*table)], [max(c) for c in zip(*table)], alpha=0.2)
    ax.set(xlabel="optimizer step", ylabel=metric, title=f"{metric}: mean and min-max over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's arguments, the ``key=value`` overrides after ``--`` passed to every run)."""
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    return argv, extra


def build_parser() -> argparse.ArgumentParser:
    """The command line: task, model, optimizers, seeds, where runs and results go, reuse and parallel jobs."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--optimizers", default="adamw,sam,deltasam")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--runs-dir", default=str(ROOT / "outputs" / "accuracy"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None)
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="read finished runs (results.json in their run dir, else in --record) instead of rerunning",
    )
    ap.add_argument(
        "--record",
        default=str(ROOT / "benchmarks" / "results" / "runs"),
        help="where each finished run's results.json and CSV log are copied (commit them); '' copies nothing",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each on cpu_count // jobs threads "
        "(default 1: one run at a time on the environment's threads)",
    )
    return ap


def run_plan(
    args: argparse.Namespace, seeds: list[int], entries: dict[str, tuple[str, list[str]]], extra: list[str]
) -> dict[str, dict[int, dict[str, Any]]]:
    """Train (or with ``--reuse`` read) every optimizer at every seed, ``--jobs`` at once: optimizer -> seed -> results."""
    optimizers = list(entries)
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    record = Path(args.record) if args.record else None

    def train(seed: int, opt: str) -> dict[str, Any]:
        name, own = entries[opt]
        run_dir = Path(args.runs_dir) / run_name(args.task, args.model, name, seed, [*extra, *own])
        r = run_one(
            args.task, args.model, name, seed, run_dir, [*extra, *own], reuse=args.reuse, record=record, threads=threads
        )
        print(
            f"{opt:10s} seed {seed}: {r['main_metric']}={r[r['main_metric']]:.4f} ({r['wall_seconds']:.0f}s)",
            flush=True,
        )
        return r

    plan = [
        (seed, opt) for seed in seeds for opt in optimizers
    ]  # seed-major: a partial plan still pairs optimizers per seed
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(lambda job: train(*job), plan))
    runs: dict[str, dict[int, dict[str, Any]]] = {o: {} for o in optimizers}
    for (seed, opt), r in zip(plan, done):
        runs[opt][seed] = r
    return runs


def build_result(
    args: argparse.Namespace,
    runs: dict[str, dict[int, dict[str, Any]]],
    seeds: list[int],
    entries: dict[str, tuple[str, list[str]]],
    extra: list[str],
    command: str,
) -> dict[str, Any]:
    """The JSON written to ``--out``: the summary per optimizer, the other dev metrics, options and settings."""
    optimizers = list(entries)
    metric = runs[optimizers[0]][seeds[0]]["main_metric"]
    summary = summarize(runs, metric)
    n_dev = runs[optimizers[0]][seeds[0]].get("dev_examples") or dev_size(args.task, metric)
    mean_all = statistics.fmean(o["mean"] for o in summary.values())
    return {
        "task": args.task,
        "model": args.model,
        "metric": metric,
        "dev_examples": n_dev,
        "one_run_se": one_run_se(metric, mean_all, n_dev) if n_dev else None,
        "optimizers": summary,
        "also": also_measured(runs, metric, n_dev),
        "options": {o: runs[o][seeds[0]]["optimizer_options"] for o in optimizers},
        "overrides": extra,
        "optimizer_overrides": {label: own for label, (_, own) in entries.items() if own},
        "holdout": runs[optimizers[0]][seeds[0]].get("holdout", 0.0),  # > 0: measured on held-out training rows
        "jobs": args.jobs,  # runs trained at once by this invocation (reused runs keep their own wall time)
        "flipped_labels": {str(s): runs[optimizers[0]][s].get("flipped_labels") for s in seeds},
        "train_loss_by_epoch": {
            o: {str(s): r["train_loss_by_epoch"] for s, r in by_seed.items()} for o, by_seed in runs.items()
        },
        "command": command,
    }


def write_outputs(args: argparse.Namespace, result: dict[str, Any], runs: dict[str, dict[int, dict[str, Any]]]) -> None:
    """Write the JSON and the Markdown table next to it, print the table, and with ``--plot`` draw the curves."""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    table = markdown(result)
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)
    if args.plot:
        plot(
            {o: {s: r["curve"] for s, r in by_seed.items()} for o, by_seed in runs.items()}, result["metric"], args.plot
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train every optimizer at every seed, then write the summary JSON, its Markdown table and the plot."""
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/accuracy.py", *argv])
    argv, extra = split_extra(argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    seeds = [int(s) for s in args.seeds.split(",")]
    entries = {label: (name, own) for label, name, own in map(parse_optimizer, args.optimizers.split(","))}
    runs = run_plan(args, seeds, entries, extra)
    result = build_result(args, runs, seeds, entries, extra, command)
    write_outputs(args, result, runs)
    return result


if __name__ == "__main__":
    main()
