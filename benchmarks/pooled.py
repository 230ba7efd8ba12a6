"""Per-instance SAM, SAM and the delta-SAM rules across settings: the pooled view.

Reads the per-setting JSON files that ``accuracy.py`` writes (each with SAM, the delta-SAM rules and a per-instance
SAM column, ``instance_sam@rho=...``, m = 1) and pairs every column with SAM by seed:

    python benchmarks/pooled.py --out benchmarks/results/pooled-minilm.json \\
        noisy-sst2=benchmarks/results/accuracy-sst2noise-instance-minilm.json ...

Per setting: the mean paired difference from SAM (points of the setting's metric) with wins-losses, for
per-instance SAM (m1 - SAM) and each delta-SAM rule (delta - SAM), and delta-SAM's share of the per-instance
gain, (delta - SAM) / (m1 - SAM) on the means (reported only where the gain is not zero). Pooled: the sign
counts over every setting and seed, and the mean of the per-setting means (the metrics differ: accuracy, MCC,
Pearson, F1, so that mean is a rough summary, the sign counts the plainer one).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from accuracy import per_instance_column

RULES = ("deltasam", "deltasam_exact")


def paired(optimizers: dict[str, Any], column: str, base: str) -> list[float]:
    """Per-seed differences ``column`` - ``base`` on the seeds both ran, in points."""
    a, b = optimizers[column]["seeds"], optimizers[base]["seeds"]
    return [100 * (a[s] - b[s]) for s in sorted(a, key=int) if s in b]


def setting_view(result: dict[str, Any]) -> dict[str, Any]:
    """One setting: each column's paired difference from SAM, and delta-SAM's share of the per-instance gain."""
    opts = result["optimizers"]
    m1 = per_instance_column(opts)
    columns = [c for c in opts if c != "sam" and c != "adamw" and (c in RULES or c.split("@")[0] == "instance_sam")]
    view: dict[str, Any] = {"metric": result["metric"], "instance": m1, "vs_sam": {}}
    for c in columns:
        d = paired(opts, c, "sam")
        if d:
            view["vs_sam"][c] = {
                "diffs": d,
                "mean": statistics.fmean(d),
                "wins": sum(x > 0 for x in d),
                "losses": sum(x < 0 for x in d),
            }
    if m1 in view["vs_sam"]:
        gain = view["vs_sam"][m1]["mean"]
        view["share"] = {r: view["vs_sam"][r]["mean"] / gain for r in RULES if r in view["vs_sam"] and gain != 0}
    return view


def pooled(views: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sign counts over every setting and seed, and the mean of per-setting means, for m1 and each rule."""
    out: dict[str, Any] = {}
    for key in ("instance", *RULES):
        rows = [
            (v["vs_sam"][v["instance"] if key == "instance" else key])
            for v in views.values()
            if (v["instance"] if key == "instance" else key) in v["vs_sam"]
        ]
        if rows:
            diffs = [x for r in rows for x in r["diffs"]]
            out[key] = {
                "settings": len(rows),
                "mean_of_setting_means": statistics.fmean(r["mean"] for r in rows),
                "wins": sum(x > 0 for x in diffs),
                "losses": sum(x < 0 for x in diffs),
                "settings_ahead": sum(r["mean"] > 0 for r in rows),
            }
    return out


def markdown(views: dict[str, dict[str, Any]], pool: dict[str, Any]) -> str:
    lines = [
        "| setting | metric | m=1 column | m1 − SAM | δ-SAM − SAM | exact rule − SAM | δ-SAM's share | exact rule's share |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(v: dict[str, Any], col: str | None) -> str:
        r = v["vs_sam"].get(col) if col else None
        return f"{r['mean']:+.2f}, {r['wins']}-{r['losses']}" if r else "-"

    for name, v in views.items():
        share = v.get("share", {})
        lines.append(
            f"| {name} | {v['metric']} | {v['instance'] or '-'} | {cell(v, v['instance'])} | {cell(v, 'deltasam')} | "
            f"{cell(v, 'deltasam_exact')} | {share.get('deltasam', float('nan')):.2f} | "
            f"{share.get('deltasam_exact', float('nan')):.2f} |"
        )
    lines += ["", "| vs SAM, pooled | settings | mean of setting means (points) | seed wins-losses | settings ahead |"]
    lines.append("|---|---|---|---|---|")
    for key, p in pool.items():
        label = "per-instance (m=1)" if key == "instance" else key
        lines.append(
            f"| {label} | {p['settings']} | {p['mean_of_setting_means']:+.2f} | {p['wins']}-{p['losses']} | "
            f"{p['settings_ahead']} of {p['settings']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="+", help="name=path of an accuracy.py JSON (one per setting)")
    ap.add_argument("--out", default=None, help="JSON to write (a Markdown table beside it)")
    args = ap.parse_args(argv)
    views = {}
    for entry in args.settings:
        name, sep, path = entry.partition("=")
        if not sep:
            ap.error(f"setting {entry!r} is not name=path (e.g. noisy-sst2=results/accuracy-sst2noise-minilm.json)")
        views[name] = setting_view(json.loads(Path(path).read_text()))
    pool = pooled(views)
    table = markdown(views, pool)
    print(table)
    result = {"settings": views, "pooled": pool}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
