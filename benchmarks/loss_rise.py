"""How strong is each method's adversary? The loss rise each run logged, against SAM's at the same setting.

Every SAM-family step logs ``deltasam/loss_rise``: the mean loss at the perturbed weights minus the mean
loss at w, on the batch it trained on. This reads the committed run records (``results/runs/``), averages
it over each run, and pairs each optimizer with SAM of the same setting and seed:

    python benchmarks/loss_rise.py --out benchmarks/results/loss-rise-minilm.json

A ratio below 1 means a weaker perturbation than SAM's at the same rho (each run on its own trajectory,
so the pairing is by setting and seed, not by weights). Runs of the per-instance route also log
``deltasam/grad_norm_ratio`` (mean_i ||g_i|| / ||g_bar||): rho_SAM / ratio is the radius at which SAM's
first-order loss rise matches it; its mean is reported too. A per-instance run with ``match_rho=true`` at rho
is paired with SAM at that rho (its rho is in SAM's units), so the table says whether the matched radius
gives SAM's loss rise in fact, not only to first order.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

RUNS = Path(__file__).resolve().parent / "results" / "runs"
SAM_RHO = float(
    OmegaConf.load(Path(__file__).resolve().parents[1] / "lightning_deltasam/glue/conf/optimizer/sam.yaml").rho
)
NAME = re.compile(r"^(?P<task>\w+?)-(?P<model>\w+?)-(?P<optimizer>[a-z_]+)-(?P<tag>.*?)-?seed(?P<seed>\d+)$")


def logged_means(run_dir: Path, keys: tuple[str, ...]) -> dict[str, float]:
    """The mean over the run's logged steps of each of ``keys`` found in its CSV log."""
    values: dict[str, list[float]] = {k: [] for k in keys}
    for path in sorted(run_dir.glob("csv/**/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                for k in keys:
                    if row.get(k):
                        values[k].append(float(row[k]))
    return {k: statistics.fmean(v) for k, v in values.items() if v}


def collect(runs: Path) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{setting: {optimizer: {seed: {key: mean}}}}, the setting being task-model-overrides (rho aside for SAM's pair)."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for run_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
        match = NAME.match(run_dir.name)
        if not match:
            continue
        means = logged_means(run_dir, ("deltasam/loss_rise", "deltasam/grad_norm_ratio"))
        if "deltasam/loss_rise" not in means:
            continue  # AdamW: no perturbation
        setting = f"{match['task']}-{match['model']}-{match['tag']}"
        out.setdefault(setting, {}).setdefault(match["optimizer"], {})[match["seed"]] = means
    return out


def sam_setting(setting: str) -> str | None:
    """The setting whose SAM runs a run pairs with: ``match_rho=true`` at rho is SAM at rho, else its own setting.

    None for ``match_rho=true`` without a rho in the name (instance_sam's own rho, which no SAM run uses here).
    """
    if "-match-rhotrue" not in setting:
        return setting
    base = setting.replace("-match-rhotrue", "")
    rho = re.search(r"-rho([0-9.]+)(?=-|$)", base)
    if rho is None:
        return None
    return base.replace(rho[0], "") if float(rho[1]) == SAM_RHO else base


def summarize(found: dict[str, dict[str, dict[str, dict[str, float]]]]) -> dict[str, Any]:
    """Per setting and optimizer: the mean loss rise per seed and its ratio to SAM's on the same seed."""
    result: dict[str, Any] = {}
    for setting, by_opt in found.items():
        sam: dict[str, dict[str, float]] | None = by_opt.get("sam") or found.get(sam_setting(setting) or "", {}).get(
            "sam"
        )
        rows = {}
        for opt, by_seed in by_opt.items():
            row: dict[str, Any] = {"loss_rise": {s: m["deltasam/loss_rise"] for s, m in by_seed.items()}}
            if sam is not None and opt != "sam":
                ratios = [
                    m["deltasam/loss_rise"] / sam[s]["deltasam/loss_rise"] for s, m in by_seed.items() if s in sam
                ]
                if ratios:
                    row["vs_sam"] = {
                        "ratios": ratios,
                        "mean": statistics.fmean(ratios),
                        "below_1": sum(r < 1 for r in ratios),
                    }
            ratio = [m["deltasam/grad_norm_ratio"] for m in by_seed.values() if "deltasam/grad_norm_ratio" in m]
            if ratio:
                row["grad_norm_ratio"] = statistics.fmean(ratio)
            rows[opt] = row
        result[setting] = rows
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=str(RUNS), help="folder of run records (results.json + CSV log per run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = summarize(collect(Path(args.runs)))
    for setting, rows in result.items():
        print(setting)
        for opt, row in rows.items():
            seeds = ", ".join(f"{s}: {v:.4f}" for s, v in sorted(row["loss_rise"].items()))
            vs = row.get("vs_sam")
            ratio = f"; / SAM {vs['mean']:.2f} ({vs['below_1']} of {len(vs['ratios'])} below 1)" if vs else ""
            print(f"  {opt:16s} loss rise {seeds}{ratio}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
