"""Layer kinds (lightning_deltasam.layers): each kind exact against a loop over instances (m=1, m=2 and the exact
Gram rule, float64), and every way a per-instance gradient could be silently wrong refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_deltasam import DeltaSAM, GramWeights, SAMConfig
from lightning_deltasam.gram_capture import GramCapture, UnsupportedModuleError
from tests.test_gram import Positional, Tied, reference_gram, tied_batch
from tests.test_instance import engine_update, loop_reference, rel

RHO = 0.05
V, D = 20, 8


class LlamaLikeRMSNorm(nn.Module):
    """transformers' Llama RMSNorm: weight * x / rms(x)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class GemmaLikeRMSNorm(LlamaLikeRMSNorm):
    """Gemma's: x / rms(x) * (1 + weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


class ScaledEmbedding(nn.Embedding):
    """Gemma's scaled word embedding: the lookup times sqrt(d)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embedding_dim**0.5


class Tokens(nn.Module):
    """Token classification-style model over [B, T] ids: ``norms`` picks the normalizations, ``rows`` flattens the
    MLP's input to [B T, d] (OPT), ``positions_first`` embeds positions [1, T] before the tokens."""

    def __init__(self, norms: str = "torch", rows: bool = False, positions_first: bool = False, scaled: bool = False):
        super().__init__()
        torch.manual_seed(4)
        self.tok = (ScaledEmbedding if scaled else nn.Embedding)(V, D, padding_idx=0)
        self.pos = nn.Embedding(16, D)
        make = {"torch": nn.RMSNorm, "llama": LlamaLikeRMSNorm, "gemma": GemmaLikeRMSNorm, "layer": nn.LayerNorm}[norms]
        self.norm1 = make(D)
        self.fc = nn.Linear(D, 12)
        self.norm2 = nn.LayerNorm(12, bias=False)
        self.head = nn.Linear(12, 3)
        self.rows, self.positions_first = rows, positions_first

    def forward(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        pos = self.pos(torch.arange(ids.shape[1]).unsqueeze(0))
        h = pos + self.tok(ids) if self.positions_first else self.tok(ids) + pos
        h = self.norm1(h)
        if self.rows:
            h = torch.tanh(self.fc(h.reshape(-1, D))).reshape(ids.shape[0], ids.shape[1], -1)
        else:
            h = torch.tanh(self.fc(h))
        return F.cross_entropy(self.head(self.norm2(h).mean(1)), batch["labels"], reduction="none")


class Summed(nn.Module):
    """Outputs added together: autograd hands every addend one gradient tensor (the capture must not share it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.tok, self.tok2 = nn.Embedding(V, D), nn.Embedding(V, D)
        self.fc1, self.fc2 = nn.Linear(D, 12), nn.Linear(D, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, batch: dict) -> torch.Tensor:
        h = self.tok(batch["input_ids"]) + self.tok2(batch["input_ids"])
        h = torch.tanh(self.fc1(h) + self.fc2(h))
        return F.cross_entropy(self.head(h.mean(1)), batch["labels"], reduction="none")


class Convs(nn.Module):
    """ViT-style patch embedding (kernel = stride) and a ResNet-style 3x3 block with a frozen BatchNorm (eval)."""

    def __init__(self, bn_trainable: bool = False) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.patch = nn.Conv2d(3, 6, kernel_size=2, stride=2)
        self.conv = nn.Conv2d(6, 6, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6).requires_grad_(bn_trainable)
        self.bn.running_mean.uniform_(-0.5, 0.5)  # statistics other than the initial ones
        self.bn.running_var.uniform_(0.5, 2.0)
        self.head = nn.Linear(6, 3)

    def forward(self, batch: dict) -> torch.Tensor:
        h = self.patch(batch["x"])
        h = h + torch.relu(self.bn(self.conv(h)))
        return F.cross_entropy(self.head(h.mean((2, 3))), batch["labels"], reduction="none")


def token_batch(n: int = 5, t: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, t), generator=g)
    ids[0, -2:] = 0  # padding
    ids[1, 1] = ids[0, 2]  # a token shared across instances
    return {"input_ids": ids, "labels": torch.randint(0, 3, (n,), generator=g)}


def image_batch(n: int = 5) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64),
        "labels": torch.randint(0, 3, (n,), generator=g),
    }


def gpt2_conv1d() -> tuple[nn.Module, dict]:
    transformers = pytest.importorskip("transformers")

    class WithConv1D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(6)
            self.tok = nn.Embedding(V, D)
            self.c_fc = transformers.pytorch_utils.Conv1D(12, D)
            self.head = nn.Linear(12, 3)

        def forward(self, batch: dict) -> torch.Tensor:
            h = torch.tanh(self.c_fc(self.tok(batch["input_ids"])))
            return F.cross_entropy(self.head(h.mean(1)), batch["labels"], reduction="none")

    return WithConv1D(), token_batch()


MODELS = {
    "rmsnorm-torch": lambda: (Tokens("torch"), token_batch()),
    "rmsnorm-llama": lambda: (Tokens("llama"), token_batch()),
    "rmsnorm-gemma": lambda: (Tokens("gemma"), token_batch()),
    "scaled-embedding": lambda: (Tokens("layer", scaled=True), token_batch()),
    "flattened-rows": lambda: (Tokens("layer", rows=True), token_batch()),
    "positions-first": lambda: (Tokens("layer", positions_first=True), token_batch()),
    "conv2d": lambda: (Convs().eval(), image_batch()),
    "batchnorm-eval": lambda: (Convs(bn_trainable=True).eval(), image_batch()),  # running statistics
    "tied-head": lambda: (Tied(), tied_batch()),
    "summed-outputs": lambda: (Summed(), token_batch()),
    "conv1d": gpt2_conv1d,
    "computed-positions": lambda: (MaskPositions(), token_batch()),  # indices read where the forward looks them up
    "checkpoint-non-reentrant": lambda: (Checkpointed(False), token_batch()),  # the recomputation is corrected too
}


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("name", list(MODELS))
def test_each_kind_equals_a_loop_over_instances(name: str, m: int) -> None:
    model, batch = MODELS[name]()
    model.double()

    def loss(b: dict) -> torch.Tensor:
        return model(b)

    model.enabled = False  # (Checkpointed) the reference runs without checkpointing
    ref = loop_reference(model, loss, batch, RHO, m)
    model.enabled = True
    got = engine_update(model, loss, batch, SAMConfig(rho=RHO, m=m, verify="always"))
    assert rel(got, ref) < 1e-9


@pytest.mark.parametrize("name", list(MODELS))
def test_each_kind_gives_the_exact_gram(name: str) -> None:
    model, batch = MODELS[name]()
    model.double()
    cap = GramCapture(model, [p for p in model.parameters() if p.requires_grad], verify="always")
    cap.first_pass(lambda: model(batch), None)
    model.enabled = False
    want = reference_gram(model, batch)
    assert float((cap.gram() - want).norm() / want.norm()) < 1e-9


class Table(nn.Module):
    """A [T, T] relative-position table computed once for the batch (T5's relative attention bias)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.tok = nn.Embedding(V, D)
        self.bias = nn.Embedding(11, 1)
        self.head = nn.Linear(D, 3)

    def forward(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        t = ids.shape[1]
        rel_pos = (torch.arange(t)[None, :] - torch.arange(t)[:, None]).clamp(-5, 5) + 5
        scores = self.bias(rel_pos).squeeze(-1)  # [T, T], shared by the batch
        h = self.tok(ids)
        h = torch.softmax(h @ h.transpose(1, 2) + scores, -1) @ h
        return F.cross_entropy(self.head(h.mean(1)), batch["labels"], reduction="none")


class Pairs(nn.Module):
    """Both sentences of a pair encoded as 2B rows in one forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.tok = nn.Embedding(V, D)
        self.fc = nn.Linear(D, D)
        self.head = nn.Linear(2 * D, 3)

    def forward(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        h = torch.tanh(self.fc(self.tok(torch.cat([ids, ids.flip(1)])))).mean(1)
        n = ids.shape[0]
        return F.cross_entropy(self.head(torch.cat([h[:n], h[n:]], 1)), batch["labels"], reduction="none")


class Checkpointed(Tokens):
    """Norm and Linear inside torch.utils.checkpoint (``enabled=False``: the same function without it, for the
    loop reference, whose functional_call weights a recomputation in the backward would not see)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__("layer")
        self.reentrant, self.enabled = reentrant, True

    def forward(self, batch: dict) -> torch.Tensor:
        h = self.tok(batch["input_ids"])

        def inner(x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.fc(self.norm1(x)))

        h = checkpoint(inner, h, use_reentrant=self.reentrant) if self.enabled else inner(h)
        return F.cross_entropy(self.head(self.norm2(h).mean(1)), batch["labels"], reduction="none")


class MaskLookup(nn.Embedding):
    """BioGPT / OPT / BART learned positions: the forward takes the attention mask and computes the indices."""

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return super().forward((torch.cumsum(mask, 1) * mask).long() + 1)


class TwoLookups(nn.Embedding):
    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return super().forward(mask) + super().forward(mask + 1)


class MaskPositions(Tokens):
    def __init__(self, kind: type[nn.Embedding] = MaskLookup) -> None:
        super().__init__("layer")
        self.pos = kind(16, D)

    def forward(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        h = self.norm1(self.tok(ids) + self.pos((ids != 0).long()))
        return F.cross_entropy(self.head(self.norm2(torch.tanh(self.fc(h))).mean(1)), batch["labels"], reduction="none")


def _frozen_embedding(**kw) -> nn.Module:
    model = Tokens("layer")
    model.tok = nn.Embedding(V, D, **kw)
    return model


REFUSED = {
    "positions-1d-at-T-equal-B": (lambda: (Positional(), _positional_batch()), r"positions\.weight|not the batch's"),
    "table-at-T-equal-B": (lambda: (Table(), token_batch(n=6, t=6)), r"bias.*not the batch's"),
    "table-at-T-other": (
        lambda: (Table(), token_batch(n=5, t=6)),
        r"bias \(Embedding\) was called on an input of shape",
    ),
    "pairs-as-2B-rows": (lambda: (Pairs(), token_batch()), r"tok|fc"),
    "scale-grad-by-freq": (lambda: (_frozen_embedding(scale_grad_by_freq=True), token_batch()), "scale_grad_by_freq"),
    "max-norm": (lambda: (_frozen_embedding(max_norm=1.0), token_batch()), "max_norm"),
    "embedding-not-a-lookup": (lambda: (MaskPositions(TwoLookups), token_batch()), r"pos \(TwoLookups\).*2 lookups"),
    "checkpoint-reentrant": (lambda: (Checkpointed(True), token_batch()), "reentrant gradient checkpointing"),
    "weight-outside-its-module": (lambda: (_outside(), tied_batch()), r"emb\.weight is used outside"),
}


def _positional_batch() -> dict:
    """Positional's positions are arange(T) 1-D; with T == B they look like a batch of single tokens."""
    batch = token_batch(n=9, t=9)
    batch["input_ids"] = batch["input_ids"] % 50
    return batch


def _outside() -> nn.Module:
    model = Tied(outside=True)
    model.dec = nn.Identity()
    return model


@pytest.mark.parametrize("how", ["m=1", "m=2", "exact"])
@pytest.mark.parametrize("name", list(REFUSED))
def test_what_cannot_be_exact_is_refused_by_name_with_w_untouched(name: str, how: str) -> None:
    build, match = REFUSED[name]
    model, batch = build()
    model.double()
    options = {
        "m=1": {"m": 1},
        "m=2": {"m": 2},
        "exact": {"reweight": GramWeights(score="gram", weights="linear")},
    }[how]
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    with pytest.raises(UnsupportedModuleError, match=match):
        opt = DeltaSAM(params, torch.optim.SGD, SAMConfig(rho=RHO, **options), lr=0.1, module=model)
        opt.step(lambda: model(batch))
    assert all(torch.equal(a, p) for a, p in zip(before, params))


def test_hf_gradient_checkpointing_is_refused_before_the_first_step() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    )
    model = transformers.BertModel(cfg)
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(
        UnsupportedModuleError, match="reentrant gradient checkpointing.*gradient_checkpointing_disable"
    ):
        GramCapture(model, list(model.parameters()))


def test_verify_off_skips_the_checks_and_auto_checks_each_new_shape_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_deltasam.layers import capture as capture_module

    calls = {"rows": 0, "grads": 0}
    for what in calls:
        original = getattr(capture_module, f"check_{what}")

        def counted(*a, _what=what, _original=original):
            calls[_what] += 1
            return _original(*a)

        monkeypatch.setattr(capture_module, f"check_{what}", counted)
    model = Tokens("layer").double()
    cap = GramCapture(model, list(model.parameters()))
    for n, t in [(5, 6), (5, 6), (5, 7), (5, 6)]:
        batch = token_batch(n=n, t=t)
        cap.first_pass(lambda b=batch: model(b), None)
        cap.clear()
    assert calls == {"rows": 2, "grads": 1}
    off = GramCapture(model, list(model.parameters()), verify="off")
    off.first_pass(lambda: model(token_batch()), None)
    assert calls == {"rows": 2, "grads": 1}
