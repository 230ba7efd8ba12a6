"""The cost of one SAM step under FSDP2 against DDP on the same model: W gloo processes on this CPU.

Each process times a plain AdamW step and a DeltaSAM SAM step (per-instance closure, the optimizer runs both
passes) under DDP and with the same model sharded by ``fully_shard`` (FSDP2), the four settings interleaved,
``--steps`` steps each per round, ``--rounds`` rounds, after ``--warmup`` untimed steps. The median per step over ranks' maxima is written to ``--out`` as JSON. On a CPU with
gloo the collectives are memory copies and the numbers are rough: they show the shape of the cost (what sharding
adds: all-gathers in each forward, reduce-scatters in each backward, one all-reduce of the norm), not a GPU's.

    python benchmarks/sharded.py --world 2 --rounds 8 --steps 5 --out benchmarks/results/sharded-cost-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_deltasam import DeltaSAM, SAMConfig  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="processes (gloo, CPU)")
    p.add_argument("--rounds", type=int, default=8, help="rounds; each times every setting in turn")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch", type=int, default=64, help="instances per process")
    p.add_argument("--width", type=int, default=1024, help="hidden width of the 3-layer MLP")
    p.add_argument("--out", type=Path, default=None, help="JSON to write (rank 0)")
    return p


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10))


def timed(step, steps: int, warmup: int) -> list[float]:
    """Per-step seconds, each the slowest rank's (a step ends when every rank is done)."""
    out = []
    for i in range(warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= warmup:
            out.append(float(elapsed))
    return out


def make_step(strategy: str, method: str, width: int, x: torch.Tensor, y: torch.Tensor):
    """One training step of ``method`` (plain AdamW, or DeltaSAM's SAM) on a fresh model under ``strategy``."""
    model = make_model(width)
    if strategy == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        model = fully_shard(model)
    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return step
    sam = DeltaSAM(model.parameters(), torch.optim.AdamW, SAMConfig(rho=0.05), lr=1e-3)
    return lambda: sam.step(lambda: F.cross_entropy(model(x), y, reduction="none"))


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch, 256, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    settings = {}
    for strategy in ("ddp", "fsdp2"):
        for method in ("adamw", "sam"):
            settings[f"{strategy}/{method}"] = make_step(strategy, method, args.width, x, y)
    results: dict[str, list[float]] = {name: [] for name in settings}
    for step in settings.values():  # warm up every setting first
        timed(step, 0, args.warmup)
    for _ in range(args.rounds):  # settings interleaved round by round: a load change on the machine hits all alike
        for name, step in settings.items():
            results[name] += timed(step, args.steps, 0)
    if rank == 0:
        medians = {k: statistics.median(v) for k, v in results.items()}
        summary = {
            "setup": (
                f"{args.world} gloo processes on a CPU of {os.cpu_count()} cores, 1 thread each; MLP 256-"
                f"{args.width}-{args.width}-10 float32, {args.batch} instances per process; DeltaSAM(SAM, AdamW), "
                "per-instance closure; median of the slowest rank's step time"
            ),
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "median_seconds": medians,
            "sam_over_adamw": {s: medians[f"{s}/sam"] / medians[f"{s}/adamw"] for s in ("ddp", "fsdp2")},
            "fsdp2_over_ddp": {m: medians[f"fsdp2/{m}"] / medians[f"ddp/{m}"] for m in ("adamw", "sam")},
            "per_step_seconds": results,
        }
        print(json.dumps({k: v for k, v in summary.items() if k != "per_step_seconds"}, indent=2))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(summary, indent=2) + "\n")
    dist.destroy_process_group()


def main() -> None:
    args = parser().parse_args()
    mp.spawn(worker, args=(args, 29531), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
