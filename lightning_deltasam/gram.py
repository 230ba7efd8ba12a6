"""The Gram matrix of per-instance gradients, K_ij = g_i . g_j, from one forward and one activation backward.

docs/algorithm.md, "The exact Gram matrix". Forward hooks keep each trainable layer's input ``a``; one backward of
sum_i l_i with respect to the layers' *outputs* (no parameter gradient is formed) gives each
layer's output gradient ``b``. Per layer, K gets that layer's per-instance Gram, and the
perturbation direction g_delta = sum_i delta_i g_i is book-kept from the same ``a`` and ``b``
(no second backward). Nothing of size B x P is kept: one layer's per-instance gradients at most.

Supported layers: ``nn.Linear`` (any leading dims, batch first), ``nn.Embedding`` (token equality,
``padding_idx`` honoured; never B x V x d) and ``nn.LayerNorm``; every bias. A trainable parameter
of any other module is refused with an error naming it, never a silently partial K.
``mode="sketch"`` projects each Linear weight's per-instance gradient G_i to P^T G_i Q with seeded
Gaussian P, Q of rank r (unbiased: E<P^T G Q, P^T H Q> = <G, H>); every other parameter stays exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GramMode = Literal["exact", "sketch"]
SUPPORTED = (nn.Linear, nn.Embedding, nn.LayerNorm)


class UnsupportedModuleError(TypeError):
    """A trainable parameter lives in a module whose per-instance gradients this module cannot form."""


@dataclass
class _Use:
    """One call of a hooked module: its (detached) input, its output (in the graph), the output's gradient."""

    a: Tensor
    out: Tensor
    a_version: int
    out_version: int
    b: Tensor | None = None


@dataclass
class _Layer:
    """A hooked module, the trainable parameters it owns, and its calls in the current forward."""

    name: str
    module: nn.Module
    weight: Tensor | None
    bias: Tensor | None
    uses: list[_Use] = field(default_factory=list)


class GramCapture:
    """Per-instance gradient Gram matrix and weighted gradients of ``module``'s layers holding ``params``.

    Usage (what the engine does in a step's first pass)::

        capture = GramCapture(module, params)
        with capture.record():
            losses = per_sample_loss(batch)        # [B]
        capture.backward(losses)                   # output gradients b, no parameter gradient
        K = capture.gram()                         # [B, B] float64
        grads = capture.weighted_grads(delta)      # {param: sum_i delta_i g_i}
        capture.clear()

    Args:
        module: the module whose forward computes the losses (its submodules are hooked).
        params: the trainable parameters K covers (the optimizer's); others count as frozen.
        mode: ``"exact"``, or ``"sketch"`` (Linear weights by rank-``rank`` Kronecker sketches).
        rank: the sketch rank r.
        generator: draws the sketch matrices (seeded identically on every rank); a fresh draw per step.
    """

    def __init__(
        self,
        module: nn.Module,
        params: Sequence[Tensor],
        mode: GramMode = "exact",
        rank: int = 32,
        generator: torch.Generator | None = None,
        purpose: str | None = None,
    ) -> None:
        if mode not in ("exact", "sketch"):
            raise ValueError(f"gram mode={mode!r} is not supported; use 'exact' or 'sketch'.")
        if purpose is None:  # who hooks the layers, and the way out, for the errors below
            self._who, self._way_out = (
                "the exact Gram rule (estimator='exact'/'sketch')",
                "use a probe rule (estimator='probes')",
            )
        else:
            self._who, self._way_out = f"the per-instance route ({purpose})", "use plain SAM (m=None)"
        check_not_compiled(module, self._who, self._way_out)
        self.mode = mode
        self.rank = rank
        self.generator = generator
        wanted = {id(p) for p in params}
        owner: dict[int, str] = {}
        self.layers: list[_Layer] = []
        for name, sub in module.named_modules():
            own = [(n, p) for n, p in sub.named_parameters(recurse=False) if id(p) in wanted and p.requires_grad]
            if not own:
                continue
            where = name or type(module).__name__
            if not isinstance(sub, SUPPORTED):
                names = ", ".join(f"{where}.{n}" for n, _ in own)
                raise UnsupportedModuleError(
                    f"{self._who} cannot form per-instance gradients of "
                    f"{type(sub).__name__} (trainable {names}); supported: Linear, Embedding, LayerNorm. "
                    f"Freeze those parameters (requires_grad=False), or {self._way_out}."
                )
            for n, p in own:
                if id(p) in owner:
                    raise UnsupportedModuleError(
                        f"parameter {where}.{n} is shared with {owner[id(p)]} (tied weights across modules): "
                        f"{self._who} does not support tied weights; untie them or {self._way_out}."
                    )
                owner[id(p)] = f"{where}.{n}"
            weight, bias = getattr(sub, "weight", None), getattr(sub, "bias", None)
            self.layers.append(
                _Layer(
                    where,
                    sub,
                    weight if isinstance(weight, Tensor) and id(weight) in wanted and weight.requires_grad else None,
                    bias if isinstance(bias, Tensor) and id(bias) in wanted and bias.requires_grad else None,
                )
            )
        missing = wanted - set(owner)
        if missing:
            raise UnsupportedModuleError(
                f"{len(missing)} trainable parameter(s) are not owned by a submodule of {type(module).__name__}: "
                f"{self._who} needs every optimized parameter inside the module it hooks."
            )
        self.batch_size: int | None = None
        self._tokens_of: dict[
            int, tuple[Tensor, Tensor] | None
        ] = {}  # per layer, shared by gram() and weighted_grads()

    # ---------------------------------------------------------------- forward
    @contextmanager
    def record(self, batch_size: int | None = None) -> Iterator[GramCapture]:
        """Hooks that keep each layer call's input and output while the losses are computed.

        ``batch_size`` B (else the leading size of the first hooked call's input). A call whose input
        has leading size 1 (or, for an Embedding, no batch dimension, as ``arange(T)`` positions) is
        broadcast over the batch: its output is expanded to B so each instance gets its own gradient.
        """
        self.clear()
        self.batch_size = batch_size
        handles = [layer.module.register_forward_hook(self._hook(layer)) for layer in self.layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, layer: _Layer):
        def hook(module: nn.Module, inputs: tuple, out: Tensor) -> Tensor | None:
            _check_eager(self._who, self._way_out)
            if not torch.is_grad_enabled():
                return None
            a = inputs[0]
            if self.batch_size is None:
                self.batch_size = int(a.shape[0]) if a.dim() > 0 else 1
            b_size = self.batch_size
            replaced: Tensor | None = None
            if isinstance(module, nn.Embedding) and a.dim() == 1 and a.shape[0] != b_size:
                a, replaced = a.unsqueeze(0), out.unsqueeze(0)  # unbatched indices, e.g. positions arange(T)
            if a.dim() == 0 or (a.shape[0] != b_size and a.shape[0] != 1):
                raise ValueError(
                    f"{layer.name} ({type(module).__name__}) was called on an input of shape {tuple(a.shape)} in a "
                    f"batch of {b_size}: {self._who} needs batch-first inputs (or a leading size of 1)."
                )
            if a.shape[0] == 1 and b_size != 1:
                base = replaced if replaced is not None else out
                a = a.expand(b_size, *a.shape[1:])
                replaced = base.expand(b_size, *base.shape[1:])
            result = replaced if replaced is not None else out
            layer.uses.append(_Use(a.detach(), result, a._version, result._version))
            return replaced

        return hook

    # --------------------------------------------------------------- backward
    def backward(self, losses: Tensor, scale: float = 1.0) -> None:
        """Output gradients b of every recorded call from one backward of ``scale * sum(losses)``.

        ``scale`` (a GradScaler's) keeps float16 gradients from underflowing; it is divided out of b.
        """
        uses = [u for layer in self.layers for u in layer.uses]
        if not uses:
            raise RuntimeError(f"{self._who} recorded no layer call: was the loss computed inside record()?")
        for layer in self.layers:
            for u in layer.uses:
                if u.out._version != u.out_version or u.a._version != u.a_version:
                    raise RuntimeError(
                        f"the input or output of {layer.name} was modified in place after its forward: "
                        f"{self._who} cannot read its gradient; avoid the in-place op or {self._way_out}."
                    )
        total = losses.sum() * scale if scale != 1.0 else losses.sum()
        grads = torch.autograd.grad(total, [u.out for u in uses], allow_unused=True)
        for u, g in zip(uses, grads):
            u.b = None if g is None else (g.float() / scale if scale != 1.0 else g)  # unscaled in float32: no underflow
            u.out = u.out.detach()  # the graph can go

    def clear(self) -> None:
        for layer in self.layers:
            layer.uses.clear()
        self._tokens_of.clear()
        self.batch_size = None

    # ------------------------------------------------------------ per layer
    def _tokens(self, layer: _Layer) -> tuple[Tensor, Tensor] | None:
        """(a, b) of all the layer's calls as [B, T_total, *] float32 (calls concatenated along tokens), formed once."""
        key = id(layer)
        if key not in self._tokens_of:
            self._tokens_of[key] = self._form_tokens(layer)
        return self._tokens_of[key]

    def _form_tokens(self, layer: _Layer) -> tuple[Tensor, Tensor] | None:
        used = [u for u in layer.uses if u.b is not None]
        if not used:
            return None
        bsz = self.batch_size
        assert bsz is not None
        mod = layer.module
        if isinstance(mod, nn.Embedding):
            a_parts = [u.a.reshape(bsz, -1) for u in used]
            b_parts = [u.b.float().reshape(bsz, -1, mod.embedding_dim) for u in used]  # type: ignore[union-attr]
        elif isinstance(mod, nn.LayerNorm):
            shape = tuple(mod.normalized_shape)
            feat = 1
            for s in shape:
                feat *= s
            a_parts = [F.layer_norm(u.a.float(), shape, eps=mod.eps).reshape(bsz, -1, feat) for u in used]
            b_parts = [u.b.float().reshape(bsz, -1, feat) for u in used]  # type: ignore[union-attr]
        else:
            a_parts = [u.a.float().reshape(bsz, -1, u.a.shape[-1]) for u in used]
            b_parts = [u.b.float().reshape(bsz, -1, u.b.shape[-1]) for u in used]  # type: ignore[union-attr]
        if len(used) == 1:
            return a_parts[0], b_parts[0]
        return torch.cat(a_parts, dim=1), torch.cat(b_parts, dim=1)

    def gram(self) -> Tensor:
        """K [B, B] (float64) summed over every covered parameter."""
        bsz = self.batch_size
        if bsz is None:
            raise RuntimeError("GramCapture.gram() before a recorded forward.")
        device = next((u.a.device for layer in self.layers for u in layer.uses), torch.device("cpu"))
        k = torch.zeros(bsz, bsz, dtype=torch.float32, device=device)
        cache: dict = {}
        for layer in self.layers:
            tok = self._tokens(layer)
            if tok is None:
                continue
            a, b = tok
            mod = layer.module
            if layer.bias is not None:
                rows = b.sum(1)
                k.addmm_(rows, rows.t())
            if layer.weight is None:
                continue
            if isinstance(mod, nn.Embedding):
                k.add_(_embedding_gram(a, b, mod.padding_idx))
            elif isinstance(mod, nn.LayerNorm):
                rows = (a * b).sum(1)
                k.addmm_(rows, rows.t())
            elif self.mode == "sketch" and min(a.shape[-1], b.shape[-1]) > self.rank:
                rows = self._sketch(a, b).flatten(1)
                k.addmm_(rows, rows.t())
            else:
                k.add_(_linear_gram(a, b, cache=cache))
        return k.double()

    def _sketch(self, a: Tensor, b: Tensor) -> Tensor:
        """P^T G_i Q = sum_t (P^T b_it)(Q^T a_it)^T for every instance: [B, r, r], never G_i itself."""
        r = self.rank
        p = torch.randn(b.shape[-1], r, generator=self.generator, device=b.device) / r**0.5
        q = torch.randn(a.shape[-1], r, generator=self.generator, device=a.device) / r**0.5
        return torch.bmm((b @ p).transpose(1, 2), a @ q)

    # ----------------------------------------------------------- book-keeping
    def weighted_grads(self, delta: Tensor) -> dict[Tensor, Tensor]:
        """{parameter: sum_i delta_i g_i} from the kept a and b (no backward); unused parameters are absent."""
        out: dict[Tensor, Tensor] = {}
        for layer in self.layers:
            tok = self._tokens(layer)
            if tok is None:
                continue
            a, b = tok
            wb = b * delta.to(b.dtype).view(-1, 1, 1)
            mod = layer.module
            if layer.bias is not None:
                out[layer.bias] = wb.sum((0, 1)).to(layer.bias.dtype)
            if layer.weight is None:
                continue
            w = layer.weight
            if isinstance(mod, nn.Embedding):
                idx, rows = a.reshape(-1), wb.reshape(-1, wb.shape[-1])
                grad = torch.zeros(w.shape, dtype=rows.dtype, device=rows.device).index_add_(0, idx, rows)
                if mod.padding_idx is not None:
                    grad[mod.padding_idx] = 0
                out[w] = grad.to(w.dtype)
            elif isinstance(mod, nn.LayerNorm):
                out[w] = (wb * a).sum((0, 1)).view(w.shape).to(w.dtype)
            else:
                flat_b, flat_a = wb.reshape(-1, wb.shape[-1]), a.reshape(-1, a.shape[-1])
                out[w] = (flat_b.t() @ flat_a).to(w.dtype)
        return out


def compiled_part(module: nn.Module) -> str | None:
    """The name of ``module`` or of a submodule compiled with ``torch.compile`` (or ``Module.compile()``), else None."""
    if getattr(module, "_compiler_ctx", None) is not None:  # Lightning's trainer.fit(torch.compile(module))
        return type(module).__name__
    for name, sub in module.named_modules():
        if type(sub).__name__ == "OptimizedModule" or getattr(sub, "_compiled_call_impl", None) is not None:
            return name or type(module).__name__
    return None


def check_not_compiled(module: nn.Module, who: str, way_out: str) -> None:
    """A clear error when ``module`` (or a part of it) is compiled: a compiled graph bypasses the forward hooks
    that read each layer's inputs and outputs, so the result would be silently wrong."""
    part = compiled_part(module)
    if part is not None:
        raise ValueError(
            f"{who} cannot run on a module compiled with torch.compile ({part} is compiled): the compiled graph "
            "bypasses the per-layer hooks it reads. Run the step on the uncompiled module (for "
            f"compiled = torch.compile(model), pass model, i.e. compiled._orig_mod), or {way_out}."
        )


def _check_eager(who: str, way_out: str) -> None:
    """The same error from inside a hook that runs while torch.compile traces (a compiled function calling the layer)."""
    if torch.compiler.is_compiling():
        raise ValueError(
            f"{who} cannot run inside a torch.compile region: the compiled graph bypasses the per-layer "
            f"hooks it reads. Call the model eagerly in the loss, or {way_out}."
        )


def _linear_gram(a: Tensor, b: Tensor, route: str = "auto", cache: dict | None = None) -> Tensor:
    """sum over tokens of a Linear weight's per-instance Gram, by the cheaper route for these sizes.

    Tokens whose output gradient is exactly zero (padding: masked keys, unpooled positions) add
    nothing and are dropped first (N' kept of N = B T).
    Materialized: G_i = b_i^T a_i (B x d_out x d_in), then G G^T: ~2N d_in d_out + 2B^2 d_in d_out FLOPs.
    Ghost: K_ij = sum_{t,t'} (a_it.a_jt')(b_it.b_jt'): ~2N'^2 (d_in + d_out) FLOPs, N'^2 memory.
    ``cache`` keeps a A^T per input tensor: layers reading one input (BERT's query, key, value) share it.
    """
    bsz, t, d_in = a.shape
    d_out = b.shape[-1]
    n = bsz * t
    fb = b.reshape(n, d_out)
    keep = fb.abs().amax(dim=1) != 0
    kept = int(keep.sum())
    materialized = 2 * n * d_in * d_out + 2 * bsz * bsz * d_in * d_out
    ghost = 2 * kept * kept * (d_in + d_out + 1)
    if route == "ghost" or (route == "auto" and ghost < materialized):
        idx = keep.nonzero().squeeze(1)
        fb = fb.index_select(0, idx)
        key = (a.data_ptr(), tuple(a.shape), tuple(a.stride()))
        hit = cache.get(key) if cache is not None else None
        if hit is not None and torch.equal(hit[0], idx):
            prod = hit[1] * (fb @ fb.t())
        else:
            fa = a.reshape(n, d_in).index_select(0, idx)
            gram_a = fa @ fa.t()
            if cache is not None:
                cache[key] = (idx, gram_a, a)  # a kept alive: its address cannot be reused by another input
            prod = gram_a * (fb @ fb.t())
        seg = idx // t
        rows = torch.zeros(bsz, kept, dtype=prod.dtype, device=prod.device).index_add_(0, seg, prod)
        return torch.zeros(bsz, bsz, dtype=prod.dtype, device=prod.device).index_add_(1, seg, rows)
    g = torch.bmm(b.transpose(1, 2), a).reshape(bsz, -1)
    return g @ g.t()


def _embedding_gram(idx: Tensor, b: Tensor, padding_idx: int | None) -> Tensor:
    """sum_{t,t'} [x_it = x_jt'] (b_it . b_jt') via the per-instance rows of the batch's distinct tokens.

    Builds B x U x d (U distinct tokens in the batch, U <= B T), never B x V x d.
    """
    bsz, t = idx.shape
    d = b.shape[-1]
    if padding_idx is not None:
        b = b.masked_fill((idx == padding_idx).unsqueeze(-1), 0.0)
    uniq, inv = torch.unique(idx.reshape(-1), return_inverse=True)
    rows = torch.zeros(bsz * uniq.numel(), d, dtype=b.dtype, device=b.device)
    inst = torch.arange(bsz, device=idx.device).repeat_interleave(t)
    rows.index_add_(0, inst * uniq.numel() + inv, b.reshape(-1, d))
    flat = rows.view(bsz, -1)
    return flat @ flat.t()
