"""The cost-against-gain frontier: each method's step cost (x AdamW's step) against its accuracy gain over AdamW,
per setting, from committed speed and accuracy records; one table (Markdown + JSON) and one plot.

    python benchmarks/frontier.py --out benchmarks/results/frontier-minilm \\
        --speed benchmarks/results/speed-frontier-minilm.json,benchmarks/results/speed-instance-minilm.json \\
        --setting noisy-sst2=benchmarks/results/accuracy-sst2noise-instance-minilm.json,... \\
        --setting cola=... --setting mrpc=...

Costs: each method's mean step over whole periods (LookSAM's and every-k SAM's cost is their mean, not a plain
step's median) divided by AdamW's mean step **in the same speed file** (the first file that timed the method), and
its peak memory over AdamW's where that file measured it. Gains: per-seed paired differences from AdamW and from
SAM (points of the setting's metric, the same seeds, subsets and flips), their mean, and the wins; an error bar
spans the method's smallest and largest paired gain. The target the issue sets: step cost <= 1.3x AdamW's, and in
>= 2 of 3 settings within 0.5 points of SAM (or ahead) with >= 2 of 3 paired wins over AdamW.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

COST_LIMIT, SAM_MARGIN, WINS_NEEDED = 1.3, 0.5, 2
DEFAULT_RULE = "gradnorm-softmax-t4-K8-head"  # the default delta-SAM's name in speed.py's records
BASELINES = ("adamw", "sam")


def speed_name(label: str) -> str:
    """The speed record's name of an accuracy column: ``sam@rho=0.05@interval=2`` -> ``sam-every2``."""
    base, *options = label.split("@")
    opts = dict(o.split("=", 1) for o in options)
    if base == "sam" and opts.get("interval", "1") != "1":
        return f"sam-every{opts['interval']}"
    if base == "instance_sam":
        return f"instance-m{opts.get('m', '1')}"
    return {"deltasam": "deltasam", "deltasam_exact": "gram-linear-t4-exact"}.get(base, base)


def load_costs(files: list[str]) -> dict[str, dict[str, Any]]:
    """name -> {"step": x AdamW, "memory": x AdamW or None, "file": where}: the step from the first file that timed
    the method, the memory from the first that measured it (each against AdamW's in the same file)."""
    costs: dict[str, dict[str, Any]] = {}
    for file in files:
        record = json.loads(Path(file).read_text())
        steps = dict(record.get("step_seconds_mean") or record["step_seconds"])
        if "deltasam" in record["step_seconds"]:  # the default delta-SAM: its rule's name in the means
            steps.setdefault("deltasam", steps.get(DEFAULT_RULE, record["step_seconds"]["deltasam"]))
        memory = record.get("peak_memory") or {}
        adamw_mb = memory.get("adamw", {}).get("peak_mb")
        for name, seconds in steps.items():
            if name == "oracle":
                continue
            cost = costs.setdefault(name, {"step": seconds / steps["adamw"], "memory": None, "file": Path(file).name})
            mb = memory.get(DEFAULT_RULE if name == "deltasam" else name, {}).get("peak_mb")
            if cost["memory"] is None and mb and adamw_mb:
                cost["memory"] = mb / adamw_mb
    return costs


def paired(opts: dict[str, Any], column: str, base: str) -> list[float]:
    a, b = opts[column]["seeds"], opts[base]["seeds"]
    return [100 * (a[s] - b[s]) for s in sorted(a, key=int) if s in b]


def setting_rows(files: list[str]) -> tuple[str, dict[str, Any]]:
    """(metric, column -> seeds, gain over AdamW and SAM) of one setting, merged over its accuracy files (each
    column's first file wins; every file's AdamW and SAM must be the same runs)."""
    merged: dict[str, Any] = {}
    metric = ""
    for file in files:
        record = json.loads(Path(file).read_text())
        metric = metric or record["metric"]
        for column, row in record["optimizers"].items():
            merged.setdefault(column, row)
    if "adamw" not in merged or "sam" not in merged:
        raise ValueError(f"{files}: a setting needs the AdamW and SAM columns (the committed 3-seed records).")
    rows = {}
    for column in merged:
        vs_adamw, vs_sam = paired(merged, column, "adamw"), paired(merged, column, "sam")
        rows[column] = {
            "seeds": merged[column]["seeds"],
            "mean": merged[column]["mean"],
            "gain": statistics.fmean(vs_adamw) if vs_adamw else 0.0,
            "gain_range": [min(vs_adamw), max(vs_adamw)] if vs_adamw else [0.0, 0.0],
            "wins": sum(d > 0 for d in vs_adamw),
            "vs_sam": statistics.fmean(vs_sam) if vs_sam else 0.0,
            "n": len(vs_adamw),
        }
    return metric, rows


def frontier(costs: dict[str, dict[str, Any]], settings: dict[str, list[str]]) -> dict[str, Any]:
    """The whole table: per setting its rows with their cost; per method whether it meets the target."""
    out: dict[str, Any] = {"costs": costs, "settings": {}, "target": {}}
    for name, files in settings.items():
        metric, rows = setting_rows(files)
        for column, row in rows.items():
            row["cost"] = costs.get(speed_name(column), {}).get("step")
        out["settings"][name] = {"metric": metric, "files": [Path(f).name for f in files], "rows": rows}
    methods = {c for s in out["settings"].values() for c in s["rows"]}
    for column in sorted(methods):
        if column in BASELINES:
            out["target"][column] = {"cost": costs.get(column, {}).get("step"), "met": False, "settings_met": []}
            continue
        cost = costs.get(speed_name(column), {}).get("step")
        met = [
            s
            for s, v in out["settings"].items()
            if column in v["rows"]
            and v["rows"][column]["vs_sam"] >= -SAM_MARGIN
            and v["rows"][column]["wins"] >= WINS_NEEDED
        ]
        ran = [s for s, v in out["settings"].items() if column in v["rows"]]
        out["target"][column] = {
            "cost": cost,
            "settings_run": ran,
            "settings_met": met,
            "met": cost is not None and cost <= COST_LIMIT and len(met) >= 2,
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    names = list(result["settings"])
    head = "| method | step × AdamW | memory × AdamW | " + " | ".join(
        f"{n} ({result['settings'][n]['metric']}): mean, vs AdamW (wins), vs SAM" for n in names
    )
    lines = [head + " | target |", "|" + "---|" * (len(names) + 4)]
    order = sorted(result["target"], key=lambda c: (result["target"][c]["cost"] or 99, c))
    for column in order:
        cost = result["costs"].get(speed_name(column), {})
        cells = [column, _x(cost.get("step")), _x(cost.get("memory"))]
        for n in names:
            row = result["settings"][n]["rows"].get(column)
            if row is None:
                cells.append("not run")
            elif column == "adamw":
                cells.append(f"{row['mean']:.4f}")
            else:
                cells.append(f"{row['mean']:.4f}, {row['gain']:+.2f} ({row['wins']}/{row['n']}), {row['vs_sam']:+.2f}")
        target = result["target"][column]
        if column in BASELINES:
            cells.append("-")
        else:
            cells.append("met" if target["met"] else f"not met ({len(target['settings_met'])} of {len(names)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(result: dict[str, Any], path: Path) -> None:
    """One panel per setting: gain over AdamW (points) against step cost, an error bar over the paired seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["settings"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        setting = result["settings"][name]
        for column, row in setting["rows"].items():
            if row["cost"] is None:
                continue
            low, high = row["gain_range"]
            ax.errorbar(row["cost"], row["gain"], yerr=[[row["gain"] - low], [high - row["gain"]]], fmt="o", capsize=3)
            ax.annotate(column, (row["cost"], row["gain"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(COST_LIMIT, color="grey", lw=0.8, ls="--")
        ax.set(title=name, xlabel="step cost (× AdamW's step)", ylabel=f"gain over AdamW ({setting['metric']}, points)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", required=True, help="speed.py records, comma-separated (the first timing a method wins)")
    ap.add_argument("--setting", action="append", required=True, help="name=accuracy.py records, comma-separated")
    ap.add_argument("--out", required=True, help="path stem: writes .json, .md and .png")
    args = ap.parse_args(argv)
    settings = {s.split("=", 1)[0]: s.split("=", 1)[1].split(",") for s in args.setting}
    result = frontier(load_costs(args.speed.split(",")), settings)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    plot(result, out.with_suffix(".png"))
    print(table)
    return result


if __name__ == "__main__":
    main()
