"""Exact per-instance SAM (``m=1``) and m-sharpness (``m=k``) in one batched second pass.

Per-instance SAM descends along (1/n) sum_i grad l_i(w + eps_i), eps_i = rho g_i/||g_i||: each
instance at its own perturbed weights. With m > 1, consecutive groups of m instances share
eps_g = rho G_g/||G_g||, G_g = sum_{i in g} g_i (m-sharpness; m = n would be SAM).

Nothing is perturbed in place. After the first pass (the hooks of :class:`~.gram.GramCapture`: each
layer's inputs ``a`` and output gradients ``b``), every layer's share of G_g is known in factored form:
a Linear weight's is sum_t b_t a_t^T over the group's tokens. Instance i's forward at w + eps_g is its
forward at w plus, in each layer, a correction that is constant with respect to w:

- Linear: y_i += c_g (x_i A_g^T) B_g (low rank), or y_i += x_i (c_g B_g^T A_g)^T (the group's dense
  delta W), whichever costs fewer FLOPs for the layer; its bias: + c_g sum_t b_t;
- LayerNorm: gamma_i = gamma + c_g sum_t b_t * xhat_t, beta_i = beta + c_g sum_t b_t;
- Embedding: the lookup of token v reads E[v] + c_g sum_{t: x_t = v} b_t (rows present in the group
  only; ``padding_idx`` unperturbed),

with c_g = rho / ||G_g|| (each parameter group's own rho). One forward with these corrections and a
backward of the mean loss leave exactly (1/n) sum_i grad l_i(w + eps_i) in ``.grad``. ||G_g||^2 comes
from the same a and b (the diagonal, or the group blocks, of the Gram matrix); no B x P tensor is formed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gram import GramCapture, _check_eager, _Layer


def _wide(t: Tensor) -> Tensor:
    """At least float32 (float64 stays float64): the corrections are book-kept at the model's precision or better."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _present(t: Tensor | None) -> Tensor:
    """A recorded output gradient (the plans keep only the calls that have one)."""
    assert t is not None
    return t


def _grouped(t: Tensor, bsz: int, m: int) -> Tensor:
    """[B, T, *rest] -> [G, m T, *rest], G = ceil(B / m): consecutive instances, zero-padded to G m."""
    groups = -(-bsz // m)
    if groups * m != bsz:
        t = torch.cat([t, t.new_zeros((groups * m - bsz, *t.shape[1:]))])
    return t.reshape(groups, m * t.shape[1], *t.shape[2:])


def _per_instance(v: Tensor, bsz: int, m: int) -> Tensor:
    """A per-group tensor [G, *] as a per-instance one [B, *]."""
    return v.repeat_interleave(m, dim=0)[:bsz] if m > 1 else v


@dataclass
class _Plan:
    """One layer's share of every group's G_g, in the form its second-pass correction uses."""

    layer: _Layer
    a: Tensor | None = None  # Linear: inputs [G, mT, d_in]; Embedding: indices [G, mT]
    b: Tensor | None = None  # output gradients [G, mT, d_out]
    dense: Tensor | None = None  # Linear, dense route: G_g as [G, d_out, d_in]
    gamma: Tensor | None = None  # LayerNorm weight's share sum_t b_t * xhat_t [G, feat]
    bias: Tensor | None = None  # sum_t b_t [G, d_out]
    # set by InstancePerturbation.scale() for the second pass: the shares times c_g
    weight_step: Tensor | None = None  # c_g b (low rank, Embedding), c_g G_g (dense), c_g gamma-share (LayerNorm)
    bias_step: Tensor | None = None  # c_g sum_t b_t, per instance [B, 1, d_out]
    bias_ratio: Tensor | None = None  # low-rank Linear: c_bias / c_weight [G, 1, 1], the bias folded into X A^T + r


class InstancePerturbation:
    """Per-instance (``m=1``) or per-group (``m=k``) SAM perturbations of ``module``'s layers, never in place.

    Usage (what the engine does in a step)::

        route = InstancePerturbation(module, params, m=1)
        with route.record():
            losses = per_sample_loss(batch)            # [B], at w
        route.backward(losses)                         # output gradients, no parameter gradient
        sq = route.group_norms_sq()                    # {param: [G]} of ||G_g restricted to param||^2
        route.scale({p: rho_p / ||G_g||})              # c_g per parameter
        with route.corrections():
            per_sample_loss(batch).mean().backward()   # (1/n) sum_i grad l_i(w + eps_i)
        route.clear()

    Args:
        module: the module whose forward computes the losses (its layers are hooked).
        params: the trainable parameters that are perturbed (the optimizer's).
        m: instances per shared perturbation (1: per-instance SAM).

    Supported layers and the refusal of any other trainable module are those of :class:`~.gram.GramCapture`.
    """

    def __init__(self, module: nn.Module, params: Sequence[Tensor], m: int = 1) -> None:
        self.capture = GramCapture(module, params, "exact", purpose=f"m={m}")
        self.m = m
        self.plans: list[_Plan] = []

    # ------------------------------------------------------------ first pass
    def record(self, batch_size: int | None = None) -> AbstractContextManager[GramCapture]:
        """Hooks that keep each layer call's input and output while the losses at w are computed."""
        self.plans = []
        return self.capture.record(batch_size)

    def backward(self, losses: Tensor, scale: float = 1.0) -> None:
        """Output gradients of every recorded call (one backward to the layers' outputs), then the layers' plans."""
        self.capture.backward(losses, scale)
        self.plans = [plan for layer in self.capture.layers if (plan := self._plan(layer)) is not None]

    @property
    def batch_size(self) -> int:
        assert self.capture.batch_size is not None
        return self.capture.batch_size

    def _plan(self, layer: _Layer) -> _Plan | None:
        used = [u for u in layer.uses if u.b is not None]
        if not used:
            return None  # no gradient reaches the layer: g_i = 0 there, nothing to correct
        bsz, m, mod = self.batch_size, self.m, layer.module

        def tokens(parts: list[Tensor]) -> Tensor:  # the calls' tokens side by side, grouped: [G, mT, *]
            return _grouped(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1), bsz, m)

        plan = _Plan(layer)
        if isinstance(mod, nn.LayerNorm):
            shape = tuple(mod.normalized_shape)
            feat = int(torch.Size(shape).numel())
            b = tokens([_wide(_present(u.b)).reshape(bsz, -1, feat) for u in used])
            if layer.weight is not None:
                xhat = tokens([F.layer_norm(_wide(u.a), shape, eps=mod.eps).reshape(bsz, -1, feat) for u in used])
                plan.gamma = (xhat * b).sum(1)
            plan.bias = b.sum(1) if layer.bias is not None else None
            return plan
        if isinstance(mod, nn.Embedding):
            plan.a = tokens([u.a.reshape(bsz, -1) for u in used])  # a padded instance's tokens have b = 0
            b = tokens([_wide(_present(u.b)).reshape(bsz, -1, mod.embedding_dim) for u in used])
            plan.b = b.masked_fill((plan.a == mod.padding_idx).unsqueeze(-1), 0.0) if mod.padding_idx is not None else b
        else:
            plan.a = tokens([_wide(u.a).reshape(bsz, -1, u.a.shape[-1]) for u in used])
            plan.b = tokens([_wide(_present(u.b)).reshape(bsz, -1, _present(u.b).shape[-1]) for u in used]).contiguous()
            n, d_in, d_out = plan.a.shape[1], plan.a.shape[2], plan.b.shape[2]
            if layer.weight is not None and n * (d_in + d_out) > d_in * d_out:  # the dense G_g costs fewer FLOPs
                plan.dense = torch.bmm(plan.b.transpose(1, 2), plan.a)
        if layer.bias is not None:
            plan.bias = plan.b.sum(1)
        return plan

    def group_norms_sq(self) -> dict[Tensor, Tensor]:
        """{parameter: [G] ||G_g||^2 restricted to it}: each group's squared gradient norm, parameter by parameter."""
        out: dict[Tensor, Tensor] = {}
        gram_a: dict[tuple, Tensor] = {}  # A A^T shared by layers reading one input (query, key, value)
        for plan in self.plans:
            layer, mod = plan.layer, plan.layer.module
            if plan.bias is not None and layer.bias is not None:
                out[layer.bias] = plan.bias.square().sum(1)
            if layer.weight is None:
                continue
            if isinstance(mod, nn.LayerNorm):
                out[layer.weight] = plan.gamma.square().sum(1)  # type: ignore[union-attr]
            elif plan.dense is not None:
                out[layer.weight] = plan.dense.square().sum((1, 2))
            else:
                a, b = plan.a, plan.b
                assert a is not None and b is not None
                if isinstance(mod, nn.Embedding):
                    same = (a.unsqueeze(2) == a.unsqueeze(1)).to(b.dtype)
                else:
                    key = (a.data_ptr(), tuple(a.shape))
                    if key not in gram_a:
                        gram_a[key] = torch.bmm(a, a.transpose(1, 2))
                    same = gram_a[key]
                out[layer.weight] = (same * torch.bmm(b, b.transpose(1, 2))).sum((1, 2))
        return out

    def batch_grad_norm_sq(self) -> Tensor:
        """||sum_i g_i||^2 over every covered parameter (the batch gradient's, unreduced), from the same a and b: a
        diagnostic (the radius at which SAM's first-order loss rise matches this route's), one GEMM per layer over
        the tokens whose output gradient is not zero."""
        total = torch.zeros((), dtype=torch.float64)
        for plan in self.plans:
            layer, mod = plan.layer, plan.layer.module
            parts: list[Tensor] = []
            if plan.bias is not None and layer.bias is not None:
                parts.append(plan.bias.sum(0))
            if layer.weight is not None:
                if plan.gamma is not None:
                    parts.append(plan.gamma.sum(0))
                elif plan.dense is not None:
                    parts.append(plan.dense.sum(0))
                elif plan.a is not None and plan.b is not None:
                    b = plan.b.reshape(-1, plan.b.shape[-1])
                    kept = b.abs().amax(dim=1) != 0
                    b = b[kept]
                    if isinstance(mod, nn.Embedding):
                        _, rows = torch.unique(plan.a.reshape(-1)[kept], return_inverse=True)
                        parts.append(
                            torch.zeros(
                                int(rows.max()) + 1 if rows.numel() else 0, b.shape[-1], dtype=b.dtype, device=b.device
                            ).index_add_(0, rows, b)
                        )
                    else:
                        parts.append(b.t() @ plan.a.reshape(-1, plan.a.shape[-1])[kept])
            for part in parts:
                total = total + part.double().square().sum().cpu()
        return total

    def group_sizes(self) -> Tensor:
        """Instances per group: m, the last group possibly fewer."""
        bsz, m = self.batch_size, self.m
        sizes = torch.full((-(-bsz // m),), float(m))
        sizes[-1] = bsz - m * (sizes.numel() - 1)
        return sizes

    def scale(self, c: dict[Tensor, Tensor]) -> None:
        """Set c_g (``{parameter: [G]}``; a parameter absent is not perturbed) and scale each layer's shares by it."""
        bsz, m = self.batch_size, self.m
        for plan in self.plans:
            layer = plan.layer
            c_w = c.get(layer.weight) if layer.weight is not None else None
            c_b = c.get(layer.bias) if layer.bias is not None else None
            plan.weight_step = plan.bias_step = plan.bias_ratio = None
            if c_w is not None:
                if plan.gamma is not None:
                    plan.weight_step = _per_instance(c_w.unsqueeze(1) * plan.gamma, bsz, m).unsqueeze(1)
                elif plan.dense is not None:
                    plan.weight_step = (c_w.view(-1, 1, 1) * plan.dense).transpose(1, 2)
                else:
                    assert plan.b is not None
                    plan.weight_step = c_w.view(-1, 1, 1) * plan.b
            if c_b is None:
                continue
            if (
                c_w is not None
                and plan.dense is None
                and plan.gamma is None
                and not isinstance(layer.module, nn.Embedding)
            ):
                # (X A^T + r) (c_w B) = c_w X A^T B + c_b 1 (sum_t b_t)^T with r = c_b / c_w: the bias rides along
                plan.bias_ratio = torch.where(c_w > 0, c_b / c_w.clamp_min(torch.finfo(c_w.dtype).tiny), 0.0).view(
                    -1, 1, 1
                )
            else:
                assert plan.bias is not None
                plan.bias_step = _per_instance(c_b.unsqueeze(1) * plan.bias, bsz, m).unsqueeze(1)

    # ----------------------------------------------------------- second pass
    @contextmanager
    def corrections(self) -> Iterator[InstancePerturbation]:
        """Forward hooks that make each layer compute instance i's output at w + eps_g (the weights stay at w)."""
        # x A^T of layers called on one input tensor with one A (query, key, value), the input held so its id stays its own
        self._shared: dict[tuple, tuple[Tensor, Tensor]] = {}
        handles = [
            plan.layer.module.register_forward_hook(self._hook(plan))
            for plan in self.plans
            if plan.weight_step is not None or plan.bias_step is not None
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._shared = {}

    def _hook(self, plan: _Plan) -> Callable[[nn.Module, tuple, Tensor], Tensor]:
        bsz, m, name = self.batch_size, self.m, plan.layer.name
        who, way_out = self.capture._who, self.capture._way_out

        def hook(module: nn.Module, inputs: tuple, out: Tensor) -> Tensor:
            _check_eager(who, way_out)
            x = inputs[0]
            if isinstance(module, nn.Embedding) and x.dim() == 1 and x.shape[0] != bsz:
                x, out = x.unsqueeze(0), out.unsqueeze(0)  # unbatched indices, e.g. positions arange(T)
            if x.dim() == 0 or x.shape[0] not in (bsz, 1):
                raise ValueError(
                    f"{name} ({type(module).__name__}) was called on an input of shape {tuple(x.shape)} in the second "
                    f"pass of a batch of {bsz}: the per-instance route (m={m}) needs the same batch-first calls in both passes."
                )
            if x.shape[0] == 1 and bsz != 1:  # broadcast over the batch: each instance gets its own correction
                x, out = x.expand(bsz, *x.shape[1:]), out.expand(bsz, *out.shape[1:])
            return self._corrected(plan, module, x, out)

        return hook

    def _corrected(self, plan: _Plan, module: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        """``module``'s output with each instance's weights moved by its eps_g (the weights themselves untouched)."""
        bsz, m = self.batch_size, self.m
        feat = out.shape[-1]
        y = out.reshape(bsz, -1, feat)
        step = plan.weight_step
        if isinstance(module, nn.LayerNorm):
            if step is not None:
                xhat = F.layer_norm(x, tuple(module.normalized_shape), eps=module.eps).reshape(bsz, -1, feat)
                y = torch.addcmul(y, xhat, step.to(y.dtype))
        elif step is not None:
            if isinstance(module, nn.Embedding):
                idx = _grouped(x.reshape(bsz, -1), bsz, m)
                left = (idx.unsqueeze(2) == plan.a.unsqueeze(1)).to(step.dtype)  # type: ignore[union-attr]
            else:
                xs = _grouped(x.reshape(bsz, -1, x.shape[-1]), bsz, m).to(step.dtype)
                if plan.dense is not None:
                    left = xs
                else:
                    a = plan.a
                    assert a is not None
                    key = (id(x), x._version, a.data_ptr(), tuple(a.shape))
                    hit = self._shared.get(key)
                    if hit is None:
                        hit = self._shared[key] = (x, torch.bmm(xs, a.transpose(1, 2)))
                    left = hit[1]
                    if plan.bias_ratio is not None:
                        left = left + plan.bias_ratio
            if m == 1 and y.dtype == step.dtype:
                y = torch.baddbmm(y, left, step)  # one fused op: y + left @ step
            else:
                tokens = y.shape[1]
                y = y + torch.bmm(left, step).reshape(-1, tokens, feat)[:bsz].to(y.dtype)
        if plan.bias_step is not None:
            y = y + plan.bias_step.to(y.dtype)
        return y.reshape(out.shape)

    def clear(self) -> None:
        self.capture.clear()
        self.plans = []
