"""Accuracy of AdamW, SAM and delta-SAM over seeds, one fixed budget, identical data order per seed.

Each run is the training app itself (``python train.py ...``), so the figures are what users get:

    python benchmarks/accuracy.py --model minilm --seeds 1,2,3 --out benchmarks/results/accuracy-sst2-minilm.json \
        --plot benchmarks/results/accuracy-sst2-minilm.png

Writes the JSON (per optimizer: final metric per seed, mean, std, mean wall seconds), a Markdown
table next to it, and with ``--plot`` the validation metric vs step (mean and min-max band over
seeds). Extra ``key=value`` arguments after ``--`` are passed to every run (e.g. trainer.max_steps=400).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]


def run_one(task: str, model: str, optimizer: str, seed: int, run_dir: Path, extra: list[str], reuse: bool = False) -> dict[str, Any]:
    """One ``train.py`` run; returns its results.json plus the validation curve from the CSV log.

    With ``reuse``, a run directory that already holds results.json (an earlier, finished run of the
    same command) is read instead of trained again.
    """
    if reuse and (run_dir / "results.json").is_file():
        results = json.loads((run_dir / "results.json").read_text())
        results["curve"] = read_curve(run_dir, results["main_metric"])
        return results
    cmd = [sys.executable, str(ROOT / "train.py"), f"task={task}", f"model={model}", f"optimizer={optimizer}",
           f"seed={seed}", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false", *extra]
    t0 = time.perf_counter()
    env = {**os.environ, "GLUE_DIR": os.environ.get("GLUE_DIR", str((ROOT / "../shared/data/glue").resolve()))}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    results["curve"] = read_curve(run_dir, results["main_metric"])
    results["bench_wall_s"] = time.perf_counter() - t0
    return results


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
    return [p for i, p in enumerate(points) if not (i + 1 < len(points) and points[i + 1][0] == p[0] + 1
                                                    and points[i + 1][1] == p[1])]


def summarize(runs: dict[str, dict[int, dict[str, Any]]], metric: str) -> dict[str, Any]:
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
    base = next(iter(runs))  # paired by seed against the first optimizer: same data order, so seed noise cancels
    for opt, by_seed in runs.items():
        diffs = [by_seed[s][metric] - runs[base][s][metric] for s in by_seed if s in runs[base]]
        out[opt]["paired"] = {"baseline": base, "mean_diff": statistics.fmean(diffs),
                              "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs)}
    return out


def markdown(result: dict[str, Any]) -> str:
    seeds = sorted({s for o in result["optimizers"].values() for s in o["seeds"]}, key=int)
    base = next(iter(result["optimizers"]))
    lines = [f"| optimizer | {' | '.join(f'seed {s}' for s in seeds)} | mean | std | vs {base}: mean Δ (points), wins-losses "
             "| wall s/run |",
             "|---|" + "---|" * (len(seeds) + 4)]
    for name, o in result["optimizers"].items():
        cells = " | ".join(f"{o['seeds'][s]:.4f}" if s in o["seeds"] else "-" for s in seeds)
        paired = o["paired"]
        vs = "-" if name == base else f"{100 * paired['mean_diff']:+.2f}, {paired['wins']}-{paired['losses']}"
        lines.append(f"| {name} | {cells} | **{o['mean']:.4f}** | {o['std']:.4f} | {vs} | {o['wall_s']:.0f} |")
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


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/accuracy.py", *argv])
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--optimizers", default="adamw,sam,deltasam")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--runs-dir", default=str(ROOT / "outputs" / "accuracy"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--reuse", action="store_true", help="read finished runs (results.json in their run dir) instead of rerunning")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    optimizers = args.optimizers.split(",")
    runs: dict[str, dict[int, dict[str, Any]]] = {o: {} for o in optimizers}
    for seed in seeds:  # seed-major: a partial run still compares optimizers on the same seeds
        for opt in optimizers:
            run_dir = Path(args.runs_dir) / run_name(args.task, args.model, opt, seed, extra)
            runs[opt][seed] = run_one(args.task, args.model, opt, seed, run_dir, extra, reuse=args.reuse)
            print(f"{opt:10s} seed {seed}: {runs[opt][seed]['main_metric']}={runs[opt][seed][runs[opt][seed]['main_metric']]:.4f} "
                  f"({runs[opt][seed]['wall_seconds']:.0f}s)", flush=True)
    metric = runs[optimizers[0]][seeds[0]]["main_metric"]
    result = {
        "task": args.task, "model": args.model, "metric": metric,
        "optimizers": summarize(runs, metric),
        "options": {o: runs[o][seeds[0]]["optimizer_options"] for o in optimizers},
        "overrides": extra,
        "command": command,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    table = markdown(result)
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)
    if args.plot:
        plot({o: {s: r["curve"] for s, r in by_seed.items()} for o, by_seed in runs.items()}, metric, args.plot)
    return result


if __name__ == "__main__":
    main()
