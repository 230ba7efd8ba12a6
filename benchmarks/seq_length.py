"""Step time and peak memory against the sequence length: SAM, exact per-instance SAM (``m=1``) and the exact Gram
rule on a MiniLM-shaped BERT and a Llama-shaped decoder (RMSNorm trainable), random init, every token real.

Each (model, method, T) runs in its own fresh process (a user runs one optimizer; methods sharing an allocator
interact): one warm-up step, then ``--steps`` timed steps (median), and the whole process's peak resident memory
(``VmHWM``: model, optimizer state and the steps, the figure a user's machine must hold).
No training run may share the cores while it runs.

    python benchmarks/seq_length.py --models bert,llama --lengths 64,128,256 --out benchmarks/results/seq-length.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import status_mb  # type: ignore[import-not-found]  # noqa: E402

from lightning_deltasam import DeltaSAM, GramWeights, SAMConfig  # noqa: E402

METHODS: dict[str, SAMConfig] = {
    "sam": SAMConfig(rho=0.05),
    "m=1": SAMConfig(rho=0.05, m=1),
    "exact": SAMConfig(rho=0.05, reweight=GramWeights(score="gram", weights="linear")),
}


class Classifier(nn.Module):
    """A transformers encoder/decoder (random init) with a mean-pooled linear head and per-instance CE."""

    def __init__(self, model: str) -> None:
        super().__init__()
        import transformers

        if model == "bert":  # all-MiniLM-L6-v2's shape
            cfg: Any = transformers.BertConfig(
                vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
            )
            self.body = transformers.BertModel(cfg, add_pooling_layer=False)
        elif model == "llama":  # the same width and depth, Llama's blocks (RMSNorm, SwiGLU, rotary positions)
            cfg = transformers.LlamaConfig(
                vocab_size=32000,
                hidden_size=384,
                num_hidden_layers=6,
                num_attention_heads=12,
                num_key_value_heads=12,
                intermediate_size=1024,
            )
            self.body = transformers.LlamaModel(cfg)
        else:
            raise ValueError(f"--models: unknown model {model!r}; use bert or llama.")
        self.head = nn.Linear(384, 2)
        self.vocab = cfg.vocab_size

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.body(input_ids=batch["input_ids"]).last_hidden_state
        return F.cross_entropy(self.head(h.mean(1)), batch["labels"], reduction="none")


def child(model: str, method: str, length: int, batch_size: int, steps: int) -> dict[str, float]:
    """One measurement in this process: median step seconds and peak MB over the timed steps."""
    torch.manual_seed(0)
    net = Classifier(model).train()
    for m in net.modules():  # dropout off: every method sees the same function
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(1, net.vocab, (batch_size, length), generator=g),
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
    }
    opt = DeltaSAM(net.parameters(), torch.optim.AdamW, METHODS[method], lr=1e-6, module=net)
    opt.step(lambda: net(batch))  # warm-up (and the first step's verification)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step(lambda: net(batch))
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "peak_mb": status_mb("VmHWM"), "times": times}  # type: ignore[dict-item]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="bert,llama")
    ap.add_argument("--lengths", default="64,128,256")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)  # model method length
    args = ap.parse_args(argv)
    if args.child:
        model, method, length = args.child
        print(json.dumps(child(model, method, int(length), args.batch_size, args.steps)))
        return {}
    rows = []
    for model in args.models.split(","):
        for length in (int(t) for t in args.lengths.split(",")):
            sam: dict[str, float] = {}
            for method in args.methods.split(","):
                cmd = [sys.executable, __file__, "--child", model, method, str(length)]
                cmd += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                got = json.loads(done.stdout.strip().splitlines()[-1])
                if method == "sam":
                    sam = got
                row = {"model": model, "T": length, "B": args.batch_size, "method": method, **got}
                if sam:
                    row["time_vs_sam"] = got["step_s"] / sam["step_s"]
                    row["memory_vs_sam"] = got["peak_mb"] / sam["peak_mb"]
                rows.append(row)
                print(
                    f"{model:6s} T={length:4d} {method:6s} {got['step_s']:7.2f} s  {got['peak_mb']:7.0f} MB"
                    + (f"  x{row['time_vs_sam']:.2f} time  x{row['memory_vs_sam']:.2f} memory" if sam else ""),
                    flush=True,
                )
    result = {"machine": f"{torch.get_num_threads()} threads, CPU", "torch": torch.__version__, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
