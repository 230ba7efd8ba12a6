"""How well does each reweighting rule approximate exact per-instance SAM? (docs/algorithm.md, "How a rule is judged")

Trains the model on SST-2 with AdamW to checkpoints early / mid / late; at each, for N batches
(model in eval mode, so every method sees the same deterministic function) computes the
oracle's update u* (exact per-instance SAM), SAM's, and every rule's update u, and reports the
correction fidelity cos(u - g_bar, u* - g_bar), the relative error ||u - u*|| / ||u* - g_bar||,
and the fraction of batches on which a rule beats SAM.

    python benchmarks/fidelity.py --model tiny --batches 4 --out fidelity-tiny.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from common import batches, build, default_delta_config, emit, gram_configs, rule_name  # type: ignore[import-not-found]

from lightning_deltasam import GramWeights, ProbeWeights, SAMConfig
from lightning_deltasam.engine import SAMEngine
from lightning_deltasam.gram_capture import GramCapture, UnsupportedModuleError
from lightning_deltasam.oracle import (
    batched_route_supported,
    fidelity,
    method_update,
    oracle_update,
    weighted_sam_update,
)
from lightning_deltasam.probing import probe_plan


def rule_configs(rho: float, probes: list[int], head: bool, families: str = "probes,gram") -> list[SAMConfig]:
    """SAM, then the weighting family: every score at tau 1, milder variants, probe counts, head scope;
    then the exact/sketched Gram rules. ``families`` picks 'probes' and/or 'gram' (SAM and the default always)."""
    out = [SAMConfig(rho=rho)]
    default = default_delta_config(rho=rho)
    if "probes" not in families.split(","):
        return [*out, default, *(gram_configs(rho) if "gram" in families.split(",") else [])]
    out.append(SAMConfig(rho=rho, reweight=ProbeWeights(score="loss")))
    for k in probes:
        for score in ("sharpness", "gradnorm", "gram"):
            out.append(SAMConfig(rho=rho, reweight=ProbeWeights(score=score, num_probes=k)))
    k0 = probes[0]
    out.append(SAMConfig(rho=rho, reweight=ProbeWeights(score="gradnorm", num_probes=k0, temperature=4.0)))
    out.append(SAMConfig(rho=rho, reweight=ProbeWeights(score="gradnorm", num_probes=k0, mix=0.5)))
    out.append(SAMConfig(rho=rho, reweight=ProbeWeights(score="gram", num_probes=k0, antithetic=True)))
    if head:
        for score, k in (("gradnorm", 8), ("gram", 32), ("gram", 128)):
            out.append(SAMConfig(rho=rho, reweight=ProbeWeights(score=score, num_probes=k, probe_scope="head")))
        out.append(
            SAMConfig(
                rho=rho, reweight=ProbeWeights(score="gradnorm", num_probes=8, probe_scope="head", temperature=4.0)
            )
        )
    if all(c != default for c in out):
        out.append(default)
    if "gram" in families.split(","):
        out += gram_configs(rho)
    return out


def exact_weights(rows: torch.Tensor, rule: str, ridge: float = 1e-3) -> torch.Tensor:
    """Weights a rule would give with exact per-instance gradients (no probe noise): a ceiling for probes."""
    if rule == "gram-exact":
        gram = (rows @ rows.t()).double()
        diag = gram.diagonal()
        coef = torch.linalg.solve(gram + ridge * diag.mean() * torch.eye(len(diag), dtype=gram.dtype), diag.sqrt())
        coef = coef.clamp_min(0)
        return (coef / coef.sum()).float() if coef.sum() > 0 else torch.full((len(diag),), 1 / len(diag))
    norms = rows.norm(dim=1)  # gradnorm-exact: softmax of the true norms at tau 1
    return torch.softmax(norms / norms.abs().mean(), dim=0)


def block_weights(rows: torch.Tensor, ranks: int, ridge: float = 1e-3) -> torch.Tensor:
    """The exact rule as ``sync="global"`` computes it over ``ranks`` DDP ranks (sample i on rank i mod ranks):
    K without its cross-rank entries, the global ridge, weights normalized over the whole batch."""
    gram = (rows @ rows.t()).double()
    same = torch.arange(len(gram)) % ranks
    gram = gram * (same.unsqueeze(0) == same.unsqueeze(1))
    diag = gram.diagonal()
    coef = torch.linalg.solve(
        gram + ridge * diag.mean() * torch.eye(len(diag), dtype=gram.dtype), diag.sqrt()
    ).clamp_min(0)
    return (coef / coef.sum()).float()


def hindsight_weights(
    module: Any, loss_fn: Callable[[Any], torch.Tensor], batch: Any, rho: float, oracle: Any
) -> torch.Tensor:
    """The hindsight ceiling: the delta whose single perturbation best fits the oracle's correction.

    To first order SAM along g_delta corrects by a non-negative combination of the corrections c_j of
    SAM along each g_j alone (weights delta_j ||g_j||); so fit the oracle's correction u* - g_bar by
    c alpha, alpha >= 0 (NNLS, projected gradient on the B x B normal equations), and take
    delta_j proportional to alpha_j / ||g_j||. Costs B backward passes: a measure, not a rule.
    """
    rows = oracle.rows
    n = rows.shape[0]
    corr = torch.empty(n, rows.shape[1], dtype=rows.dtype)  # [B, P], filled in place (B x P floats, no copies)
    for j in range(n):
        torch.sub(
            weighted_sam_update(module, loss_fn, batch, rho, torch.eye(n)[j], rows), oracle.mean_grad, out=corr[j]
        )
    target = oracle.update - oracle.mean_grad
    gram, rhs = (corr @ corr.t()).double(), (corr @ target).double()
    del corr
    alpha = torch.full((n,), 1.0 / n, dtype=torch.float64)
    step = 1.0 / float(torch.linalg.eigvalsh(gram)[-1])
    for _ in range(2000):
        alpha = (alpha - step * (gram @ alpha - rhs)).clamp_min(0)
    delta = alpha / rows.norm(dim=1).double().clamp_min(1e-30)
    return (delta / delta.sum()).float() if delta.sum() > 0 else torch.full((n,), 1.0 / n)


def measure(
    module: Any,
    batch: dict[str, torch.Tensor],
    configs: list[SAMConfig],
    engines: dict[str, SAMEngine],
    rho: float,
    hindsight: bool = False,
    route: str = "auto",
) -> dict[str, tuple[float, float]]:
    loss_fn: Callable[[Any], torch.Tensor] = module.per_sample_loss
    oracle = oracle_update(module, loss_fn, batch, rho=rho, keep_rows=True, route=route)
    out: dict[str, tuple[float, float]] = {}
    for cfg in configs:
        name = rule_name(cfg)
        engine = engines.setdefault(
            name, SAMEngine([{"params": [p for p in module.parameters() if p.requires_grad]}], cfg)
        )
        forward, head = probe_plan(module, batch, cfg.step_probe_scope)
        u = method_update(module, forward, cfg, engine=engine, head=head)
        out[name] = fidelity(u, oracle.update, oracle.mean_grad)
    assert oracle.rows is not None
    for rule in ("gradnorm-exact", "gram-exact"):
        u = weighted_sam_update(module, loss_fn, batch, rho, exact_weights(oracle.rows, rule), oracle.rows)
        out[rule] = fidelity(u, oracle.update, oracle.mean_grad)
    if any(isinstance(c.weighting, GramWeights) for c in configs):
        u = weighted_sam_update(module, loss_fn, batch, rho, block_weights(oracle.rows, 2), oracle.rows)
        out["gram-exact-2ranks"] = fidelity(u, oracle.update, oracle.mean_grad)
    if hindsight:
        u = weighted_sam_update(
            module, loss_fn, batch, rho, hindsight_weights(module, loss_fn, batch, rho, oracle), oracle.rows
        )
        out["hindsight-ceiling"] = fidelity(u, oracle.update, oracle.mean_grad)
    return out


def summarize(per_ckpt: dict[str, list[dict[str, tuple[float, float]]]]) -> dict[str, Any]:
    names = list(next(iter(per_ckpt.values()))[0])
    rules: dict[str, Any] = {}
    for name in names:
        fid = [b[name][0] for batches_ in per_ckpt.values() for b in batches_]
        rel = [b[name][1] for batches_ in per_ckpt.values() for b in batches_]
        sam = [b["sam"][0] for batches_ in per_ckpt.values() for b in batches_]
        rules[name] = {
            "fidelity_mean": statistics.fmean(fid),
            "fidelity_min": min(fid),
            "beats_sam_frac": sum(f > s for f, s in zip(fid, sam)) / len(fid),
            "relerr_mean": statistics.fmean(rel),
            "by_checkpoint": {ck: statistics.fmean(b[name][0] for b in bs) for ck, bs in per_ckpt.items()},
        }
    return rules


def build_parser() -> argparse.ArgumentParser:
    """The command line: model, batches, batch size, rho, training length, rule families, oracle route, seed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    ap.add_argument("--batches", type=int, default=4, help="measured batches per checkpoint")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="AdamW steps to the late checkpoint (default: tiny 300, minilm 150)",
    )
    ap.add_argument("--probes", default="3,8", help="probe counts K to study (comma-separated)")
    ap.add_argument("--no-head", action="store_true", help="skip head-only probe rules")
    ap.add_argument(
        "--families", default="probes,gram", help="rule families: probes and/or gram (SAM and the default always)"
    )
    ap.add_argument(
        "--hindsight", action="store_true", help="also the hindsight ceiling (B extra backward passes per batch)"
    )
    ap.add_argument(
        "--oracle-route",
        choices=["auto", "batched", "loop"],
        default="auto",
        help="how the oracle's u* is formed: the batched per-instance route (exact; Linear / Embedding / "
        "LayerNorm models) or the loop of backward passes; auto: batched where the model allows",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    return ap


def select_rules(args: argparse.Namespace, module: Any) -> list[SAMConfig]:
    """The rules to measure (:func:`rule_configs`), less the Gram rules when the model has a layer they refuse."""
    configs = rule_configs(
        args.rho, [int(k) for k in args.probes.split(",")], head=not args.no_head, families=args.families
    )
    try:
        GramCapture(module, [p for p in module.parameters() if p.requires_grad])
    except UnsupportedModuleError as err:  # e.g. model=tiny's nn.MultiheadAttention
        print(f"[gram rules skipped: {err}]")
        configs = [c for c in configs if not isinstance(c.weighting, GramWeights)]
    return configs


def measure_checkpoints(
    args: argparse.Namespace, datamodule: Any, module: Any, configs: list[SAMConfig], checkpoints: dict[str, int]
) -> tuple[dict[str, list[dict[str, tuple[float, float]]]], float]:
    """Train with AdamW to each checkpoint and measure ``args.batches`` batches there: (per checkpoint, start time)."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=module.hparams.lr)
    train_stream, measure_stream = batches(datamodule, args.seed), batches(datamodule, args.seed + 1000)
    per_ckpt: dict[str, list[dict[str, tuple[float, float]]]] = {}
    engines: dict[str, SAMEngine] = {}
    step, t0 = 0, time.perf_counter()
    for label, target in checkpoints.items():
        module.train()
        while step < target:  # plain AdamW at the config's lr: a harness to reach realistic weights
            opt.zero_grad(set_to_none=True)
            module.per_sample_loss(next(train_stream)).mean().backward()
            opt.step()
            step += 1
        module.eval()
        per_ckpt[label] = [
            measure(module, next(measure_stream), configs, engines, args.rho, args.hindsight, args.oracle_route)
            for _ in range(args.batches)
        ]
        print(f"[{label}: step {step}, {time.perf_counter() - t0:.0f}s]", flush=True)
    return per_ckpt, t0


def build_result(
    args: argparse.Namespace,
    module: Any,
    per_ckpt: dict[str, list[dict[str, tuple[float, float]]]],
    checkpoints: dict[str, int],
    t0: float,
) -> dict[str, Any]:
    """The JSON written to ``--out``: the library default's name, the summary per rule and the setup."""
    rules = summarize(per_ckpt)
    default = rule_name(default_delta_config(rho=args.rho))
    return {
        "default": default,
        "rules": rules,
        "setup": {
            "model": args.model,
            "task": "sst2",
            "batch_size": args.batch_size,
            "rho": args.rho,
            "batches_per_checkpoint": args.batches,
            "checkpoints": checkpoints,
            "seed": args.seed,
            "families": args.families,
            "hindsight": args.hindsight,
            "oracle_route": "batched"
            if args.oracle_route == "batched" or (args.oracle_route == "auto" and batched_route_supported(module))
            else "loop",
            "wall_s": round(time.perf_counter() - t0, 1),
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every rule's fidelity at the early / mid / late checkpoints, print the table and write the JSON."""
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    train_steps = args.train_steps or (300 if args.model == "tiny" else 150)
    checkpoints = {"early": max(1, train_steps // 6), "mid": train_steps // 2, "late": train_steps}
    _, datamodule, module = build(args.model, args.batch_size, args.seed)
    configs = select_rules(args, module)
    per_ckpt, t0 = measure_checkpoints(args, datamodule, module, configs, checkpoints)
    result = build_result(args, module, per_ckpt, checkpoints, t0)
    return emit(result, args.out, print_table)


def print_table(result: dict[str, Any]) -> None:
    rules = result["rules"]
    cks = list(result["setup"]["checkpoints"])
    print(
        f"\nfidelity vs exact per-instance SAM: {result['setup']['model']} on sst2, B={result['setup']['batch_size']}, "
        f"rho={result['setup']['rho']}, {result['setup']['batches_per_checkpoint']} batches x {len(cks)} checkpoints"
    )
    head = f"{'rule':42s} {'fid mean':>8s} {'fid min':>8s} {'>SAM':>6s} {'relerr':>7s} " + " ".join(
        f"{c:>7s}" for c in cks
    )
    print(head)
    print("-" * len(head))
    for name, r in sorted(rules.items(), key=lambda kv: -kv[1]["fidelity_mean"]):
        mark = " *" if name == result["default"] else ""
        row = (
            f"{name + mark:42s} {r['fidelity_mean']:8.3f} {r['fidelity_min']:8.3f} {r['beats_sam_frac']:6.2f} "
            f"{r['relerr_mean']:7.3f} " + " ".join(f"{r['by_checkpoint'][c]:7.3f}" for c in cks)
        )
        print(row)
    print(
        "(* the library default; gradnorm-exact / gram-exact / gram-exact-2ranks / hindsight-ceiling use the oracle's "
        "per-instance gradients: references, not rules; *-exact / *-sketch-r* are the trainable estimator rules)"
    )
    assert all(math.isfinite(r["fidelity_mean"]) for r in rules.values())


if __name__ == "__main__":
    main()
