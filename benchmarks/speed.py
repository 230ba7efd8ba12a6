"""Time per optimizer step: AdamW, SAM, delta-SAM (each rule and probe count), the peers and the oracle.

All methods run interleaved in one process on the same real SST-2 batches after a warm-up;
each figure is the median over repeats. The peers are other SAM implementations timed in the same
run on the same module and batches: ``pytorch_optimizer.SAM`` (benchmark-only dependency, the
``[bench]`` extra; skipped when absent) and ``ref-sam``, a minimal two-step SAM written below from
the published algorithm. Also reports the engine's own overhead (step time minus the model's
forwards, backwards and the base optimizer step) and how the oracle's cost grows with the batch
size against delta-SAM's.

    python benchmarks/speed.py --model tiny --steps 5 --out speed-tiny.json
    python benchmarks/speed.py --model minilm --steps 8 --isolate 4 --methods peers --probes '' --scaling '' --oracle-repeats 0
    python benchmarks/speed.py --model minilm --steps 8 --methods gram --probes '' --scaling '' --gram-sweep --memory
    python benchmarks/speed.py --model minilm --steps 8 --methods instance --probes '' --scaling '' --instance-sweep --memory

``--isolate R`` times each method in its own fresh process instead (R rounds, rotated order), as a user runs
one optimizer: methods sharing one module and allocator interact (see RESULTS.md, section 2).
``--methods gram`` times the exact and sketched Gram rules against SAM; ``--gram-sweep`` how SAM, the
exact rule, the r = 32 sketch and the oracle grow with the batch size B and the sequence length T;
``--methods instance`` times exact per-instance SAM (m = 1) and m-sharpness (m = 4, 8) in one batched second pass
against SAM, the default delta-SAM and the loop oracle; ``--instance-sweep`` SAM, m = 1 and the loop oracle over B and T.
``--memory`` each method's peak resident memory over a step, each in a fresh process.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import (  # type: ignore[import-not-found]
    batches,
    build,
    default_delta_config,
    emit,
    gram_configs,
    instance_configs,
    period,
    rule_name,
    status_mb,
    variant_configs,
)
from torch import Tensor

from lightning_deltasam import ProbeWeights, SAMConfig
from lightning_deltasam.backend import Backend
from lightning_deltasam.batch_rows import select_rows
from lightning_deltasam.distributed import Reducer
from lightning_deltasam.engine import SAMEngine
from lightning_deltasam.oracle import oracle_update
from lightning_deltasam.passes import Passes
from lightning_deltasam.probing import probe_plan

PEERS = ("pt-sam", "ref-sam")


class TimingBackend(Backend):
    """Plain backend that adds up the seconds spent in backward."""

    def __init__(self) -> None:
        super().__init__(Reducer())
        self.backward_s = 0.0

    def backward(self, loss: Tensor) -> None:
        t = time.perf_counter()
        loss.backward()
        self.backward_s += time.perf_counter() - t


class Method:
    """One method's engine and its own AdamW, stepping the shared module."""

    def __init__(self, module: Any, config: SAMConfig) -> None:
        self.module, self.config = module, config
        params = [p for p in module.parameters() if p.requires_grad]
        self.base = torch.optim.AdamW(params, lr=1e-6)
        self.engine = SAMEngine(self.base.param_groups, config, base_state=lambda: self.base.state)

    def _forward(self, batch: dict[str, Tensor]) -> tuple[Any, Any]:
        """(the forward, the head probe): the module's per-instance losses, with the logits for MESA."""
        if self.config.variant.needs_outputs:
            logits = lambda: self.module(batch)  # noqa: E731
            return (lambda: (lambda z: (F.cross_entropy(z, batch["labels"], reduction="none"), z))(logits())), None
        return probe_plan(self.module, batch, self.config.step_probe_scope)

    def _rows(self, batch: dict[str, Tensor]) -> Any:
        """ESAM's forward on chosen rows of ``batch``; None for the other methods."""
        if not self.config.variant.selects_instances:
            return None
        size = len(batch["labels"])
        return lambda rows: self.module.per_sample_loss(select_rows(batch, rows, size))

    def step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        backend = TimingBackend()
        forward, head = self._forward(batch)
        fwd = {"s": 0.0}

        def timed_forward() -> Tensor:
            t = time.perf_counter()
            out = forward()
            fwd["s"] += time.perf_counter() - t
            return out

        base = {"s": 0.0}

        def base_step() -> None:
            t = time.perf_counter()
            self.base.step()
            base["s"] += time.perf_counter() - t

        rows = self._rows(batch)

        def timed_rows(chosen: Tensor) -> Tensor:  # ESAM's forward on chosen rows: the model's time too
            t = time.perf_counter()
            out = rows(chosen)
            fwd["s"] += time.perf_counter() - t
            return out

        t0 = time.perf_counter()
        passes = Passes(timed_forward, backend, head=head, module=self.module, select=rows and timed_rows)
        self.engine.step(passes, base_step)
        total = time.perf_counter() - t0
        model = fwd["s"] + backend.backward_s
        return {"total": total, "model": model, "base": base["s"], "engine": total - model - base["s"]}


class RefSAM(torch.optim.Optimizer):
    """The minimal two-step SAM of the published algorithm (davda54/sam style), the speed reference.

    ``first_step``: save ``p.data.clone()``, perturb by rho g/||g||; ``second_step``: put the saved
    tensors back by ``p.data = old_p`` (a storage swap, no copy) and step the base optimizer.
    """

    def __init__(self, params: Any, base_optimizer: Any, rho: float = 0.05, **kwargs: Any) -> None:
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grad_norm = torch.norm(
            torch.stack([p.grad.norm(p=2) for g in self.param_groups for p in g["params"] if p.grad is not None]), p=2
        )
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.data = self.state[p].pop("old_p")
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


class Peer:
    """A peer SAM optimizer (its own AdamW inside) stepping the shared module, timed like :class:`Method`."""

    def __init__(self, module: Any, name: str, rho: float) -> None:
        self.module = module
        params = [p for p in module.parameters() if p.requires_grad]
        if name == "pt-sam":
            from pytorch_optimizer import SAM  # benchmark-only dependency: pip install -e ".[bench]"

            self.opt: Any = SAM(params, torch.optim.AdamW, rho=rho, lr=1e-6)
        else:
            self.opt = RefSAM(params, torch.optim.AdamW, rho=rho, lr=1e-6)

    def step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        model = {"s": 0.0}

        def forward_backward() -> Tensor:
            t = time.perf_counter()
            loss = self.module.per_sample_loss(batch).mean()
            loss.backward()
            model["s"] += time.perf_counter() - t
            return loss

        base_opt = self.opt.base_optimizer
        base = {"s": 0.0}
        inner = base_opt.step

        def timed_base_step(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            out = inner(*a, **k)
            base["s"] += time.perf_counter() - t
            return out

        t0 = time.perf_counter()
        base_opt.step = timed_base_step  # instance attribute, removed below
        try:
            self.opt.zero_grad()
            forward_backward()
            self.opt.first_step(zero_grad=True)
            forward_backward()
            self.opt.second_step(zero_grad=True)
        finally:
            del base_opt.step
        total = time.perf_counter() - t0
        return {"total": total, "model": model["s"], "base": base["s"], "engine": total - model["s"] - base["s"]}


ENGINE_PHASES = ("backup", "ascent_norm", "perturb", "restore", "finite_check", "statistics")


def profile_phases(method: Method, batches: list[dict[str, Tensor]], steps: int) -> dict[str, float]:
    """Milliseconds per step in each of the engine's ``deltasam.<phase>`` profiler ranges (median over ``steps``
    steps, each profiled on its own), plus ``engine_total``: the sum of the phases in ENGINE_PHASES."""
    from torch.profiler import ProfilerActivity, profile

    per_step: list[dict[str, float]] = []
    for i in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            method.step(batches[i % len(batches)])
        times: dict[str, float] = {}
        for e in prof.events():
            if e.name.startswith("deltasam."):
                key = e.name[len("deltasam.") :]
                times[key] = times.get(key, 0.0) + e.cpu_time_total / 1e3
        times["engine_total"] = sum(times.get(k, 0.0) for k in ENGINE_PHASES)
        per_step.append(times)
    keys = sorted({k for t in per_step for k in t})
    return {k: statistics.median(t.get(k, 0.0) for t in per_step) for k in keys}


def available_peers() -> dict[str, str]:
    """Peer name -> '' if it can run here, else why not."""
    out = {name: "" for name in PEERS}
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        out["pt-sam"] = "pytorch_optimizer is not installed (pip install -e '.[bench]')"
    return out


def oracle_seconds(module: Any, batch: dict[str, Tensor], rho: float) -> float:
    t = time.perf_counter()
    oracle_update(module, module.per_sample_loss, batch, rho=rho)
    return time.perf_counter() - t


def method_configs(rho: float, probes: list[int]) -> list[SAMConfig]:
    out = [SAMConfig(rho=0.0), SAMConfig(rho=rho)]
    default = default_delta_config(rho=rho)
    out.append(default)
    for k in probes:
        for score in ("sharpness", "gradnorm", "gram"):
            out.append(SAMConfig(rho=rho, reweight=ProbeWeights(score=score, num_probes=k)))
    out.append(SAMConfig(rho=rho, reweight=ProbeWeights(score="loss")))
    out.append(SAMConfig(rho=rho, reweight=ProbeWeights(score="gradnorm", num_probes=8, probe_scope="head")))
    out.append(SAMConfig(rho=rho, reweight=ProbeWeights(score="gram", num_probes=32, probe_scope="head")))
    unique: dict[str, SAMConfig] = {}
    for c in out:
        unique.setdefault(rule_name(c), c)
    return list(unique.values())


def build_parser() -> argparse.ArgumentParser:
    """The command line: model, steps, batch size, rho and what to time besides the step."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed repeats per method (after one warm-up each); default 5, or 20 when LookSAM / every-k SAM are timed "
        "(whole periods: their cost is the mean over a period)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument(
        "--probes",
        default="3",
        help="probe counts K to time the full-model probe rules at (comma-separated; '' skips them)",
    )
    ap.add_argument(
        "--scaling",
        default=None,
        help="batch sizes for oracle vs delta-SAM scaling (default: tiny 8..128, minilm 8,16,32; '' skips it)",
    )
    ap.add_argument("--oracle-repeats", type=int, default=1, help="0 skips the oracle")
    ap.add_argument(
        "--profile-steps",
        type=int,
        default=2,
        help="steps of SAM and default delta-SAM profiled (torch.profiler) "
        "for the engine's time per phase, after the timed run; 0 skips it",
    )
    _add_method_flags(ap)
    return ap


def _add_method_flags(ap: argparse.ArgumentParser) -> None:
    """The flags that pick the methods, the sweeps, memory, process isolation and the output file."""
    ap.add_argument(
        "--methods",
        choices=["all", "peers", "gram", "instance", "variants"],
        default="all",
        help="all: every rule below; peers: AdamW, SAM, default delta-SAM and the peer SAM implementations; "
        "gram: AdamW, SAM, default delta-SAM and the exact / sketched Gram rules; instance: AdamW, SAM, "
        "default delta-SAM and per-instance SAM (m = 1) / m-sharpness (m = 4, 8); variants: AdamW, SAM, default "
        "delta-SAM, GSAM, WSAM, LookSAM, FriendlySAM, Momentum-SAM and SAM every 2 / 4 steps",
    )
    ap.add_argument(
        "--gram-sweep", action="store_true", help="SAM, exact, sketch-r32 and oracle over B (8,16,32) and T (16,32,64)"
    )
    ap.add_argument(
        "--instance-sweep", action="store_true", help="SAM, m = 1 and the loop oracle over B (8,16,32) and T (16,32,64)"
    )
    ap.add_argument(
        "--memory", action="store_true", help="peak RSS of one step of each method, each in a fresh process"
    )
    ap.add_argument(
        "--isolate",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="time each method in its own fresh process (ROUNDS rounds in rotated order, --steps steps each) "
        "instead of interleaved on one shared module; 0: interleaved",
    )
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # the child process of --memory
    ap.add_argument("--time-of", default=None, help=argparse.SUPPRESS)  # the child process of --isolate
    ap.add_argument("--only", default="", help="time only these methods (comma-separated names), with AdamW and SAM")
    ap.add_argument("--out", default=None)


def select_configs(args: argparse.Namespace, default: str) -> list[SAMConfig]:
    """The SAM configurations ``--methods`` times (``--probes`` sets the probe counts of the full-model rules)."""
    configs = method_configs(args.rho, [int(k) for k in args.probes.split(",") if k])
    if args.methods in ("peers", "gram", "instance", "variants"):
        configs = [c for c in configs if rule_name(c) in ("adamw", "sam", default)]
    if args.methods in ("all", "gram"):
        configs += gram_configs(args.rho)
    if args.methods in ("all", "instance"):
        configs += instance_configs(args.rho)
    if args.methods in ("all", "variants"):
        configs += variant_configs(args.rho)
    if args.only:  # a subset by name (AdamW, SAM and default delta-SAM stay: the ratios are against them)
        keep = {"adamw", "sam", default, *args.only.split(",")}
        configs = [c for c in configs if rule_name(c) in keep]
    return configs


def make_methods(
    args: argparse.Namespace, module: Any, configs: list[SAMConfig]
) -> tuple[dict[str, Any], dict[str, str]]:
    """(name -> method stepping ``module``: one per config, then the peers that can run; peer -> why skipped)."""
    methods: dict[str, Any] = {rule_name(c): Method(module, c) for c in configs}
    peers_skipped = {name: why for name, why in available_peers().items() if why}
    if args.methods not in ("gram", "instance", "variants"):
        methods.update({name: Peer(module, name, args.rho) for name in PEERS if name not in peers_skipped})
    return methods, peers_skipped


def resolve_steps(ap: argparse.ArgumentParser, args: argparse.Namespace, configs: list[SAMConfig]) -> None:
    """Set ``args.steps`` (default 5, or one whole period of LookSAM / every-k SAM) and refuse partial periods."""
    periods = [period(c) for c in configs]
    whole = math.lcm(*periods) if periods else 1
    if args.steps is None:
        args.steps = 5 if whole == 1 else whole
    if args.steps % whole:
        ap.error(
            f"--steps={args.steps}: LookSAM and every-k SAM cost their mean over whole periods, so with them the "
            f"step count must be a multiple of {whole}; use --steps {whole} (the default) or --methods peers / gram / instance"
        )


def step_medians(
    args: argparse.Namespace,
    module: Any,
    methods: dict[str, Any],
    fixed: list[dict[str, Tensor]],
    samples: dict[str, list[dict[str, float]]],
    default: str,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(median seconds per step of each method, the default as 'deltasam' and the oracle; engine ms per phase)."""
    med = {name: statistics.median(s["total"] for s in v) for name, v in samples.items()}
    med["deltasam"] = med[default]
    phases = {
        name: profile_phases(methods[name], fixed, args.profile_steps)
        for name in ("sam", default)
        if args.profile_steps > 0
    }
    if args.oracle_repeats > 0:
        module.eval()
        oracle_runs = [oracle_seconds(module, fixed[i % len(fixed)], args.rho) for i in range(args.oracle_repeats)]
        med["oracle"] = statistics.median(oracle_runs)
        module.train()
    return med, phases


def step_ratios(
    args: argparse.Namespace,
    methods: dict[str, Any],
    samples: dict[str, list[dict[str, float]]],
    med: dict[str, float],
) -> tuple[dict[str, float], dict[str, float]]:
    """(each method's step time over SAM's and AdamW's; mean seconds per step of each method)."""
    ratios = {
        "sam/adamw": med["sam"] / med["adamw"],
        "deltasam/sam": med["deltasam"] / med["sam"],
        "deltasam/adamw": med["deltasam"] / med["adamw"],
    }
    if "oracle" in med:
        ratios["oracle/sam"] = med["oracle"] / med["sam"]
    by_mean = {rule_name(c) for c in variant_configs(args.rho)}  # costed by their mean over whole periods, below
    for name in methods:
        if name not in ("adamw", "sam") and name not in by_mean:
            ratios[f"{name}/sam"] = med[name] / med["sam"]
    # A variant that perturbs only some steps (LookSAM's k, every-k SAM) costs its mean over whole periods, not the
    # median step (a plain one): its ratios use means, and --steps must hold whole periods (checked above).
    mean = {name: statistics.fmean(s["total"] for s in v) for name, v in samples.items()}
    for name in by_mean & set(mean):
        ratios[f"{name}/sam"] = mean[name] / mean["sam"]
        ratios[f"{name}/adamw"] = mean[name] / mean["adamw"]
    if by_mean & set(mean):
        ratios["sam/adamw (means)"] = mean["sam"] / mean["adamw"]
    return ratios, mean


def peer_comparison(samples: dict[str, list[dict[str, float]]], med: dict[str, float]) -> dict[str, Any]:
    """SAM's step time over each peer's, paired per repeat, and the fastest peer ({} when no peer ran)."""
    peers = [name for name in PEERS if name in samples]
    vs_peers: dict[str, Any] = {}
    if peers:
        # Paired per repeat (the same batch, back to back), so machine noise common to both cancels.
        fastest = min(peers, key=lambda n: med[n])
        for name in peers:
            paired = [a["total"] / b["total"] for a, b in zip(samples["sam"], samples[name])]
            fastest_steps = min(s["total"] for s in samples["sam"]) / min(s["total"] for s in samples[name])
            vs_peers[f"sam/{name}"] = {
                "median_of_medians": med["sam"] / med[name],
                "min_over_min": fastest_steps,
                **_spread(paired),
                "median_ci95": _median_ci(paired),
            }
        vs_peers["fastest_peer"] = fastest
        vs_peers["sam/fastest_peer"] = med["sam"] / med[fastest]
    return vs_peers


def batch_scaling(args: argparse.Namespace, datamodule: Any, module: Any) -> list[dict[str, Any]]:
    """Seconds per step of default delta-SAM and of the oracle at each ``--scaling`` batch size."""
    scaling_arg = ("8,16,32,64,128" if args.model == "tiny" else "8,16,32") if args.scaling is None else args.scaling
    sizes = [int(b) for b in scaling_arg.split(",") if b]
    scaling = []
    for b in sizes:
        _, dm_b, _ = build(args.model, b) if b != args.batch_size else (None, datamodule, None)
        batch = next(batches(dm_b, seed=1))
        m = Method(module, default_delta_config(rho=args.rho))
        m.step(batch)  # warm-up at this shape
        delta_s = statistics.median(m.step(batch)["total"] for _ in range(3))
        module.eval()
        oracle_s = oracle_seconds(module, batch, args.rho)
        module.train()
        scaling.append(
            {"batch_size": b, "deltasam_s": delta_s, "oracle_s": oracle_s, "oracle/deltasam": oracle_s / delta_s}
        )
    return scaling


def peak_memory(args: argparse.Namespace, methods: dict[str, Any]) -> dict[str, Any]:
    """Each method's peak memory over a step, each in a fresh process, and its ratio to SAM's ({} without --memory)."""
    memory = {name: memory_of(args, name) for name in methods} if args.memory else {}
    if memory:
        memory = {name: {**m, "/sam": m["peak_mb"] / memory["sam"]["peak_mb"]} for name, m in memory.items()}
    return memory


def sample_summaries(samples: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Per method: the engine's share of the step, seconds per phase, the spread and the raw step times."""
    return {
        "engine_overhead_frac": {
            name: statistics.median(s["engine"] / s["total"] for s in v) for name, v in samples.items()
        },
        "phase_seconds": {
            name: {k: statistics.median(s[k] for s in v) for k in ("model", "base", "engine")}
            for name, v in samples.items()
        },
        "step_seconds_spread": {name: _spread([s["total"] for s in v]) for name, v in samples.items()},
        "step_seconds_samples": {name: [round(s["total"], 5) for s in v] for name, v in samples.items()},
    }


def run_setup(
    args: argparse.Namespace,
    samples: dict[str, list[dict[str, float]]],
    default: str,
    load_start: float,
    t_start: float,
) -> dict[str, Any]:
    """The result's ``setup``: model, batch size, rho, repeats, timing mode, threads, load average and wall time."""
    return {
        "model": args.model,
        "batch_size": args.batch_size,
        "rho": args.rho,
        "repeats": len(samples["sam"]),
        "timing": f"each method in its own process, {args.isolate} rounds of {args.steps} steps"
        if args.isolate
        else "interleaved on one shared module",
        "default": default,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time the selected methods, print the table and write the JSON (or, as a child process, time one method)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.memory_of is not None:
        return memory_child(args)
    if args.time_of is not None:
        return time_child(args)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]  # > the core count: other jobs shared the CPU, timings are noisy
    _, datamodule, module = build(args.model, args.batch_size)
    module.train()  # dropout on: the training step as users run it
    stream = batches(datamodule, seed=0)
    fixed = [next(stream) for _ in range(4)]
    default = rule_name(default_delta_config(rho=args.rho))
    configs = select_configs(args, default)
    methods, peers_skipped = make_methods(args, module, configs)
    resolve_steps(ap, args, configs)
    names = list(methods)
    samples = isolated_samples(args, names) if args.isolate else interleaved_samples(methods, fixed, args.steps)
    med, phases = step_medians(args, module, methods, fixed, samples, default)
    overhead = statistics.median(s["engine"] / s["total"] for s in samples["sam"])
    ratios, mean = step_ratios(args, methods, samples, med)
    vs_peers = peer_comparison(samples, med)
    scaling = batch_scaling(args, datamodule, module)
    sweep = gram_sweep(args, module, GRAM_SWEEP) if args.gram_sweep else []
    if args.instance_sweep:
        sweep += gram_sweep(args, module, INSTANCE_SWEEP)
    memory = peak_memory(args, methods)
    result = {
        "step_seconds": med,
        "step_seconds_mean": mean,
        "ratios": ratios,
        "engine_overhead_frac_of_sam_step": overhead,
        **sample_summaries(samples),  # engine_overhead_frac, phase_seconds, step_seconds_spread and _samples
        "vs_peers": vs_peers,
        "engine_phase_ms": phases,
        "peers_skipped": peers_skipped,
        "batch_scaling": scaling,
        "gram_sweep": sweep,
        "peak_memory": memory,
        "setup": run_setup(args, samples, default, load_start, t_start),
    }
    return emit(result, args.out, print_table)


GRAM_SWEEP = ("sam", "gram-linear-t4-exact", "gram-linear-t4-sketch-r32")
INSTANCE_SWEEP = ("sam", "instance-m1")


def _fixed_length(batch: dict[str, Tensor], length: int) -> dict[str, Tensor]:
    """``batch`` truncated or padded (pad id 0, mask 0) to ``length`` tokens: padding='max_length' at that T."""
    out = {}
    for key, value in batch.items():
        if value.dim() == 2:
            value = value[:, :length]
            if value.shape[1] < length:
                value = torch.nn.functional.pad(value, (0, length - value.shape[1]), value=0)
        out[key] = value
    return out


def gram_sweep(args: argparse.Namespace, module: Any, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """Seconds per step of SAM, the methods ``names`` and the loop oracle as B and T grow."""
    known = [SAMConfig(rho=args.rho), *gram_configs(args.rho), *instance_configs(args.rho)]
    rules = {rule_name(c): c for c in known if rule_name(c) in names}
    points = [(b, None) for b in (8, 16, 32)] + [(32, t) for t in (16, 32, 64)]
    rows = []
    for b, t in points:
        _, dm_b, _ = build(args.model, b)
        batch = next(batches(dm_b, seed=1))
        batch = _fixed_length(batch, t) if t is not None else batch
        row: dict[str, Any] = {
            "batch_size": b,
            "tokens": int(batch["input_ids"].shape[1]),
            "real_tokens": int(batch["attention_mask"].sum()),
        }
        for name, cfg in rules.items():
            m = Method(module, cfg)
            m.step(batch)  # warm-up at this shape
            row[name] = statistics.median(m.step(batch)["total"] for _ in range(3))
        module.eval()
        row["oracle"] = oracle_seconds(module, batch, args.rho)
        module.train()
        row.update({f"{n}/sam": row[n] / row["sam"] for n in (*names[1:], "oracle")})
        rows.append(row)
        print(
            f"[sweep B={b} T={row['tokens']}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if "/" in k) + "]",
            flush=True,
        )
    return rows


def interleaved_samples(
    methods: dict[str, Any], fixed: list[dict[str, Tensor]], steps: int
) -> dict[str, list[dict[str, float]]]:
    """Every method steps the one shared module in turn, after one warm-up step each: ``steps`` samples per method."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    names = list(methods)
    for rep in range(steps + 1):  # interleaved: every method sees the machine in the same state
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotated: no method always follows another
        for name in order:
            r = methods[name].step(fixed[rep % len(fixed)])
            if rep > 0:
                samples[name].append(r)
    return samples


def isolated_samples(args: argparse.Namespace, names: list[str]) -> dict[str, list[dict[str, float]]]:
    """Each method in its own fresh process, as a user runs one optimizer: ``args.isolate`` rounds, the order rotated
    per round, ``args.steps`` steps per process on the same batches. Sample i of every method is the same round and
    batch, so pairs stay close in time. One shared module would let the methods' allocations interact: a method whose
    weights another method's step reallocated runs its own passes slower (benchmarks/RESULTS.md, section 2)."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for rnd in range(args.isolate):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            samples[name].extend(_child(args, "--steps", str(args.steps), "--time-of", name))
    return samples


def _child(args: argparse.Namespace, *flags: str) -> Any:
    """Run this script in a fresh process with the parent's model, batch size and rho plus ``flags``; its last
    printed line, parsed as JSON."""
    import json
    import subprocess
    import sys

    cmd = [
        sys.executable,
        __file__,
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--rho",
        str(args.rho),
        *flags,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_method(name: str, module: Any, rho: float) -> Any:
    """The method called ``name`` (a rule name, or a peer) stepping ``module``."""
    configs = {
        rule_name(c): c
        for c in [
            SAMConfig(rho=0.0),
            SAMConfig(rho=rho),
            default_delta_config(rho=rho),
            *gram_configs(rho),
            *instance_configs(rho),
            *variant_configs(rho),
        ]
    }
    return Method(module, configs[name]) if name in configs else Peer(module, name, rho)


def time_child(args: argparse.Namespace) -> list[dict[str, float]]:
    """One method alone in this process: one warm-up step, then ``args.steps`` timed steps over the fixed batches."""
    import json

    torch.manual_seed(0)
    _, datamodule, module = build(args.model, args.batch_size)
    module.train()
    stream = batches(datamodule, seed=0)
    fixed = [next(stream) for _ in range(4)]
    method = make_method(args.time_of, module, args.rho)
    method.step(fixed[0])
    out = [method.step(fixed[(rep + 1) % len(fixed)]) for rep in range(args.steps)]
    print(json.dumps(out))
    return out


def memory_of(args: argparse.Namespace, name: str) -> dict[str, float]:
    """Peak RSS over two steps of ``name`` in a fresh process, less the RSS once the model and batch are loaded."""
    return _child(args, "--memory-of", name)


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """One method's peak resident memory over two steps (Linux): the high-water mark is reset once the
    model and batch are loaded (``/proc/self/clear_refs``), so loading's own peak does not count."""
    import json

    torch.manual_seed(0)
    _, datamodule, module = build(args.model, args.batch_size)
    module.train()
    batch = next(batches(datamodule, seed=0))
    method = make_method(args.memory_of, module, args.rho)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_mb("VmRSS")
    for _ in range(2):
        method.step(batch)
    out = {"peak_mb": status_mb("VmHWM") - base, "baseline_mb": base}
    print(json.dumps(out))
    return out


def _median_ci(xs: list[float], resamples: int = 2000) -> list[float]:
    """95% bootstrap interval of the median of ``xs`` (seeded): whether a paired ratio is told apart from 1."""
    import random

    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    return [meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]]


def _spread(xs: list[float]) -> dict[str, float]:
    """Median, quartiles and range of ``xs`` (the spread over repeats)."""
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs), "n": len(xs)}


def print_table(result: dict[str, Any]) -> None:
    med, setup = result["step_seconds"], result["setup"]
    print(
        f"\nstep time, {setup['model']} on sst2, B={setup['batch_size']}, median of {setup['repeats']} "
        f"({setup.get('timing', 'interleaved')}, {setup['threads']} threads)"
    )
    print(f"{'method':40s} {'s/step':>8s} {'/adamw':>7s} {'/sam':>6s} {'engine%':>8s}")
    for name, s in med.items():
        if name == "deltasam":
            continue
        eng = result["engine_overhead_frac"].get(name)
        mark = " *" if name == setup["default"] else ""
        print(
            f"{name + mark:40s} {s:8.3f} {s / med['adamw']:7.2f} {s / med['sam']:6.2f} "
            f"{'' if eng is None else f'{100 * eng:7.1f}%':>8s}"
        )
    print(
        f"(* default delta-SAM; engine% = step time outside the model's forward/backward and AdamW; "
        f"SAM's: {100 * result['engine_overhead_frac_of_sam_step']:.1f}%)"
    )
    ratios = result["ratios"]
    by_mean = [n for n in med if f"{n}/adamw" in ratios and n not in ("sam", "deltasam")]
    if by_mean:  # the variants' cost is their mean step over whole periods (LookSAM's median is a plain step)
        print("the variants' mean step over whole periods (what one that skips perturbations costs on average):")
        for name in by_mean:
            print(
                f"{name:40s} {result['step_seconds_mean'][name]:8.3f} {ratios[f'{name}/adamw']:7.2f} "
                f"{ratios[f'{name}/sam']:6.2f}"
            )
    vs = result.get("vs_peers") or {}
    for key, row in vs.items():
        if isinstance(row, dict):
            ci = row.get("median_ci95") or [float("nan")] * 2
            print(
                f"{key:24s} paired per repeat: median {row['median']:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}; quartiles "
                f"{row['q1']:.3f}-{row['q3']:.3f}, range {row['min']:.3f}-{row['max']:.3f}, n={row['n']}); "
                f"fastest step / fastest step {row['min_over_min']:.3f}"
            )
    if vs:
        print(f"fastest peer: {vs['fastest_peer']}; SAM / fastest peer (medians): {vs['sam/fastest_peer']:.3f}")
    for name, ph in (result.get("engine_phase_ms") or {}).items():
        print(f"engine phases, {name} (ms/step, profiled): " + ", ".join(f"{k} {v:.1f}" for k, v in ph.items()))
    for name, why in (result.get("peers_skipped") or {}).items():
        print(f"peer {name} skipped: {why}")
    for name, m in (result.get("peak_memory") or {}).items():
        print(f"peak memory of a step, {name}: {m['peak_mb']:.0f} MB over the loaded model ({m['/sam']:.2f}x SAM's)")
    for row in result.get("gram_sweep") or []:
        print(
            f"B={row['batch_size']:3d} T={row['tokens']:3d} ({row['real_tokens']} real tokens): SAM {row['sam']:.3f} s; "
            + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.endswith("/sam"))
        )
    if not result["batch_scaling"]:
        return
    print(f"\n{'B':>5s} {'deltasam s':>11s} {'oracle s':>9s} {'oracle/delta':>12s}")
    for row in result["batch_scaling"]:
        print(f"{row['batch_size']:5d} {row['deltasam_s']:11.3f} {row['oracle_s']:9.3f} {row['oracle/deltasam']:12.1f}")


if __name__ == "__main__":
    main()
