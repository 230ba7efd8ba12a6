"""Exact per-instance SAM (``m=1``) and m-sharpness (``m=k``) in one batched second pass.

Per-instance SAM descends along (1/n) sum_i grad l_i(w + eps_i), eps_i = rho g_i/||g_i||: each
instance at its own perturbed weights. With m > 1, consecutive groups of m instances share
eps_g = rho G_g/||G_g||, G_g = sum_{i in g} g_i (m-sharpness; m = n would be SAM).

Nothing is perturbed in place. After the first pass (the hooks of :class:`~.layers.LayerCapture`: each
layer's inputs and output gradients, checked to account for the whole batch), every layer kind states its
share of G_g in factored form (:mod:`.layers.terms`: a Linear weight's is sum_t b_t a_t^T over the group's
tokens). Instance i's forward at w + eps_g is its forward at w plus, in each layer, a correction that is
constant with respect to w (each kind's ``correct``: a Linear adds c_g (x_i A_g^T) B_g or x_i (c_g G_g)^T,
a norm c_g G_g * xhat, an Embedding the perturbed rows it looks up), with c_g = rho / ||G_g|| (each parameter
group's own rho). A weight used by several layers (a tied head) gets the sum of their terms in every use.
One forward with these corrections and a backward of the mean loss leave exactly
(1/n) sum_i grad l_i(w + eps_i) in ``.grad``. ||G_g||^2 comes from the same pieces (their inner products
within each group, cross terms included); no B x P tensor is formed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor, nn

from .layers import Kind, LayerCapture, LowRank, Term, Verify
from .layers.compiled import check_eager
from .layers.terms import as_matrix, pair_sum, sum_norm_sq


class InstancePerturbation:
    """Per-instance (``m=1``) or per-group (``m=k``) SAM perturbations of ``module``'s layers, never in place.

    Usage (what the engine does in a step)::

        route = InstancePerturbation(module, params, m=1)
        losses = route.first_pass(lambda: per_sample_loss(batch), None)  # [B] at w; output gradients only
        sq = route.group_norms_sq()                    # {param: [G]} of ||G_g restricted to param||^2
        route.scale({p: rho_p / ||G_g||})              # c_g per parameter
        with route.corrections():
            per_sample_loss(batch).mean().backward()   # (1/n) sum_i grad l_i(w + eps_i)
        route.clear()

    Args:
        module: the module whose forward computes the losses (its layers are hooked).
        params: the trainable parameters that are perturbed (the optimizer's).
        m: instances per shared perturbation (1: per-instance SAM).
        verify: the capture's checks against autograd (:class:`~.layers.LayerCapture`).

    Supported layers, and the refusal of anything else by name, are those of :mod:`.layers`.
    """

    def __init__(self, module: nn.Module, params: Sequence[Tensor], m: int = 1, verify: Verify = "auto") -> None:
        self.capture = LayerCapture(module, params, f"the per-instance route (m={m})", "use plain SAM (m=None)", verify)
        self.m = m
        self.eps: dict[int, list[Term]] = {}

    # ------------------------------------------------------------ first pass
    def record(self, batch_size: int | None = None) -> AbstractContextManager[LayerCapture]:
        """Hooks that keep each layer call's input and output while the losses at w are computed."""
        return self.capture.record(batch_size)

    def backward(self, losses: Tensor, scale: float = 1.0) -> None:
        """Output gradients of every recorded call (one backward to the layers' outputs), after the checks."""
        self.capture.backward(losses, scale)

    def first_pass(self, run: Callable[[], Tensor], batch_size: int | None, scale: float = 1.0) -> Tensor:
        """:meth:`record` + ``run()`` + :meth:`backward` (the forward run again if B was not known beforehand)."""
        return self.capture.first_pass(run, batch_size, scale)

    @property
    def batch_size(self) -> int:
        assert self.capture.batch_size is not None
        return self.capture.batch_size

    def _terms(self) -> dict[int, list[Term]]:
        return self.capture.terms(self.m, dense=True, consume=True)

    def group_norms_sq(self) -> dict[Tensor, Tensor]:
        """{parameter: [G] ||G_g||^2 restricted to it}: each group's squared gradient norm, parameter by parameter."""
        out: dict[Tensor, Tensor] = {}
        shared: dict[tuple, Tensor] = {}  # right right^T of layers reading one input (query, key, value)
        for pid, terms in self._terms().items():
            total = None
            for k, t in enumerate(terms):
                for u in terms[k:]:
                    part = _self_pair(t, shared) if u is t else 2.0 * pair_sum(t, u)
                    total = part if total is None else total + part
            assert total is not None
            out[self.capture.params[pid]] = total
        return out

    def batch_grad_norm_sq(self) -> Tensor:
        """||sum_i g_i||^2 over every covered parameter (the batch gradient's, unreduced), from the same pieces: a
        diagnostic (the radius at which SAM's first-order loss rise matches this route's)."""
        total = torch.zeros((), dtype=torch.float64)
        for pid, terms in self._terms().items():
            total = total + sum_norm_sq(terms, as_matrix(self.capture.params[pid])).cpu()
        return total

    def group_sizes(self) -> Tensor:
        """Instances per group: m, the last group possibly fewer."""
        bsz, m = self.batch_size, self.m
        sizes = torch.full((-(-bsz // m),), float(m))
        sizes[-1] = bsz - m * (sizes.numel() - 1)
        return sizes

    def scale(self, c: dict[Tensor, Tensor]) -> None:
        """Set c_g (``{parameter: [G]}``; a parameter absent is not perturbed): eps_g = c_g G_g, as terms."""
        terms = self._terms()  # scaled in place (their output-gradient side): no second copy of every layer's terms
        self.eps = {id(p): [t.scale_(cp) for t in terms.get(id(p), [])] for p, cp in c.items()}
        self.capture.release()

    # ----------------------------------------------------------- second pass
    @contextmanager
    def corrections(self) -> Iterator[InstancePerturbation]:
        """Forward hooks that make each layer compute instance i's output at w + eps_g (the weights stay at w)."""
        cache: dict = {}  # x A^T of layers called on one input (query, key, value), the input held alive
        kinds = [k for k in self.capture.kinds if any(self.eps.get(id(p)) for p in k.params.values())]
        handles = [h for k in kinds for h in k.register(self._hook(k, cache))]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            cache.clear()

    def _hook(self, kind: Kind, cache: dict) -> Callable[[nn.Module, tuple, Tensor], Tensor | None]:
        capture = self.capture

        def hook(module: nn.Module, inputs: tuple, out: Tensor) -> Tensor | None:
            if kind.busy:
                return None
            check_eager(capture.who, capture.way_out)
            x, y, shape = capture.batch_view(kind, kind.input_of(inputs), out)
            y = kind.correct(x, y, self.eps, self.batch_size, self.m, cache)
            return y if shape is None else y.reshape(shape)

        return hook

    def clear(self) -> None:
        self.capture.clear()
        self.eps = {}


def _self_pair(t: Term, shared: dict[tuple, Tensor]) -> Tensor:
    """[G] ||t_g||^2, with right right^T shared by LowRank terms on one input (query, key, value)."""
    if not isinstance(t, LowRank):
        return pair_sum(t, t)
    r = t.right
    key = (r.data_ptr(), tuple(r.shape), r.stride())
    if key not in shared:
        shared[key] = torch.bmm(r, r.transpose(1, 2))
    return (torch.bmm(t.left, t.left.transpose(1, 2)) * shared[key]).sum((1, 2))
