"""The per-instance SAM oracle against a closed form, both gradient paths, and the fidelity measure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_deltasam import SAMConfig
from lightning_deltasam.oracle import fidelity, method_update, oracle_update, per_sample_grads, weighted_sam_update
from tests.helpers import make_data, make_net, per_sample_ce, reference_sam_update


def _linear_problem():
    torch.manual_seed(0)
    lin = nn.Linear(3, 1, bias=False)
    x, y = torch.randn(5, 3), torch.randn(5)
    loss_fn = lambda b: 0.5 * (lin(b[0]).squeeze(1) - b[1]) ** 2  # noqa: E731
    return lin, (x, y), loss_fn


@pytest.mark.parametrize("method", ["func", "loop"])
def test_oracle_matches_the_closed_form_for_least_squares(method):
    lin, (x, y), loss_fn = _linear_problem()
    w, rho = lin.weight.detach().reshape(-1), 0.1
    r = x @ w - y
    g = r[:, None] * x  # per-instance gradients
    eps = rho * g / g.norm(dim=1, keepdim=True)
    u_star = ((((w + eps) * x).sum(1) - y)[:, None] * x).mean(0)
    out = oracle_update(lin, loss_fn, (x, y), rho=rho, method=method)
    torch.testing.assert_close(out.mean_grad, g.mean(0))
    torch.testing.assert_close(out.update, u_star)
    torch.testing.assert_close(out.per_sample_grad_norms, g.norm(dim=1))


def test_func_and_loop_per_sample_grads_agree_on_an_mlp():
    x, y = make_data(n=6)
    net = make_net().eval()
    fn = lambda b: per_sample_ce(net, *b)  # noqa: E731
    a = per_sample_grads(net, fn, (x, y), method="func")
    b = per_sample_grads(net, fn, (x, y), method="loop")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_method_update_of_sam_is_the_reference_descent_gradient():
    x, y = make_data(n=8)
    net = make_net().eval()
    fn = lambda b: per_sample_ce(net, *b)  # noqa: E731
    before = [p.detach().clone() for p in net.parameters()]
    u = method_update(net, lambda: fn((x, y)), SAMConfig(rho=0.05))
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))  # weights untouched
    ref = reference_sam_update(net, x, y, 0.05, lr=1.0)  # p - 1.0 * u
    expected = torch.cat([(p.detach() - ref[k]).reshape(-1) for k, p in net.named_parameters()])
    torch.testing.assert_close(u, expected, atol=1e-6, rtol=1e-5)


def test_one_instance_batch_sam_is_the_oracle():
    x, y = make_data(n=1)
    net = make_net().eval()
    fn = lambda b: per_sample_ce(net, *b)  # noqa: E731
    out = oracle_update(net, fn, (x, y), rho=0.05, keep_rows=True)
    u = method_update(net, lambda: fn((x, y)), SAMConfig(rho=0.05))
    torch.testing.assert_close(u, out.update, atol=1e-6, rtol=1e-5)
    u2 = weighted_sam_update(net, fn, (x, y), 0.05, torch.ones(1), out.rows)
    torch.testing.assert_close(u2, out.update, atol=1e-6, rtol=1e-5)


def test_weighted_sam_update_with_uniform_weights_is_sam():
    x, y = make_data(n=8)
    net = make_net().eval()
    fn = lambda b: per_sample_ce(net, *b)  # noqa: E731
    rows = oracle_update(net, fn, (x, y), rho=0.05, keep_rows=True).rows
    u = weighted_sam_update(net, fn, (x, y), 0.05, torch.full((8,), 1 / 8), rows)
    torch.testing.assert_close(u, method_update(net, lambda: fn((x, y)), SAMConfig(rho=0.05)), atol=1e-6, rtol=1e-5)


def test_fidelity_measure():
    g = torch.tensor([1.0, 0.0, 0.0])
    star = torch.tensor([1.0, 1.0, 0.0])
    assert fidelity(star, star, g) == (pytest.approx(1.0), pytest.approx(0.0))
    cos, rel = fidelity(torch.tensor([1.0, 0.0, 1.0]), star, g)
    assert cos == pytest.approx(0.0, abs=1e-12) and rel == pytest.approx(2**0.5)


@pytest.mark.needs("transformers")
def test_batched_route_is_the_loop_oracle():
    """The oracle's two routes agree: the batched second pass against n + 1 backward passes (the reference)."""
    from lightning_deltasam.oracle import batched_route_supported
    from tests.test_gram import TinyBert, make_batch

    model = TinyBert().eval()
    batch = make_batch()
    fn = lambda b: model(b)  # noqa: E731
    loop = oracle_update(model, fn, batch, rho=0.05, route="loop")
    batched = oracle_update(model, fn, batch, rho=0.05, route="batched")
    assert batched_route_supported(model)
    assert float((batched.update - loop.update).norm() / loop.update.norm()) < 1e-5
    assert torch.equal(batched.mean_grad, loop.mean_grad)
    with pytest.raises(ValueError, match="route='loop'"):
        oracle_update(model, fn, batch, rho=0.05, adaptive=True, route="batched")
    assert not batched_route_supported(torch.nn.MultiheadAttention(4, 2))
