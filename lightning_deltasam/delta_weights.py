"""Per-instance scores from probe losses, and the delta weights on the simplex (docs/algorithm.md,
"The weighting family").

Every normalizer is taken through a :class:`~lightning_deltasam.distributed.Reducer`, so with
``sync="global"`` the weights of each rank's instances are those of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from .distributed import Reducer
from .options import WeightingOptions, check_choice, check_number

Score = Literal["sharpness", "gradnorm", "loss", "gram"]
WeightForm = Literal["softmax", "linear"]


@dataclass(frozen=True)
class DeltaWeights(WeightingOptions):
    """What every delta-SAM weighting shares: the instance score and how scores become weights on the simplex.

    Args:
        score: the instance score: ``"sharpness"``, ``"gradnorm"``, ``"loss"`` or ``"gram"``.
        weights: ``"softmax"`` (delta = softmax(s / (temperature mean|s|))) or ``"linear"`` (delta proportional to
            max(s, 0)).
        temperature: the softmax's temperature.
        mix: the share of uniform weights mixed into delta, in [0, 1].
        gram_ridge: lambda of the ``gram`` score, relative to mean diag(K).
    """

    score: Score = "gradnorm"
    weights: WeightForm = "softmax"
    temperature: float = 4.0
    mix: float = 0.0
    gram_ridge: float = 1e-3

    def check(self) -> None:
        check_choice("score", self.score, get_args(Score))
        check_choice("weights", self.weights, get_args(WeightForm))
        check_number("temperature", self.temperature, minimum=0.0, strict=True)
        check_number("mix", self.mix, minimum=0.0)
        if self.mix > 1:
            raise ValueError(f"mix={self.mix!r} must lie in [0, 1] (the share of uniform weights).")
        check_number("gram_ridge", self.gram_ridge, minimum=0.0)


@dataclass
class ProbeLosses:
    """Per-instance losses at probe points: ``plus[k, i]`` = l_i(w + dw_k); ``minus`` at w - dw_k (antithetic)."""

    plus: Tensor
    minus: Tensor | None = None


def probe_differences(probes: ProbeLosses, losses: Tensor, score: str) -> Tensor:
    """The d_ik matrix [K, n] a score is built from.

    Plain probes give l(w+dw) - l(w). Antithetic pairs split it: the gradient part
    (l(w+dw) - l(w-dw))/2 for ``gradnorm``/``gram``, the curvature part
    (l(w+dw) + l(w-dw))/2 - l(w) for ``sharpness``.
    """
    base = losses.detach().to(probes.plus.dtype).unsqueeze(0)
    if probes.minus is None:
        return probes.plus - base
    if score == "sharpness":
        return 0.5 * (probes.plus + probes.minus) - base
    return 0.5 * (probes.plus - probes.minus)


def instance_scores(
    options: DeltaWeights,
    losses: Tensor,
    probes: ProbeLosses | None,
    probe_std: float,
    reducer: Reducer,
) -> Tensor:
    """Scores s_i for the configured rule (for ``gram``, the raw coefficients (K+lambda I)^-1 diag(K)^1/2)."""
    if options.score == "loss":
        return losses.detach().float()
    if probes is None:
        raise ValueError(f"score={options.score!r} needs probe losses; none were computed.")
    d = probe_differences(probes, losses, options.score).float()
    if options.score == "sharpness":
        return d.mean(dim=0)
    if options.score == "gradnorm":
        return d.pow(2).mean(dim=0).sqrt()
    return _gram_coefficients(d, probe_std, options.gram_ridge, reducer)


def _gram_coefficients(d: Tensor, probe_std: float, ridge: float, reducer: Reducer) -> Tensor:
    """delta = (K + lambda I)^-1 diag(K)^1/2 with K = D^T D / (K sigma^2), on the global batch."""
    d_all, offset = reducer.gather_cat(d, dim=1)
    gram = d_all.t() @ d_all / (d_all.shape[0] * probe_std**2)
    return solve_gram(gram, gram.diagonal().clamp_min(0).mean(), ridge).to(d.dtype).narrow(0, offset, d.shape[1])


def solve_gram(gram: Tensor, diag_mean: Tensor, ridge: float) -> Tensor:
    """(K + lambda I)^-1 diag(K)^1/2 in float64, lambda = ridge * mean diag K; NaN if singular."""
    k = gram.double()
    diag = k.diagonal().clamp_min(0)
    lam = ridge * diag_mean.double().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    try:
        coef = torch.linalg.solve(k + lam * eye, diag.sqrt())
    except RuntimeError:  # singular despite the ridge (e.g. all-zero gradients): no usable scores
        coef = torch.full_like(diag, float("nan"))
    return coef


def gram_scores(gram: Tensor, options: DeltaWeights, reducer: Reducer) -> Tensor:
    """Scores from this rank's exact (or sketched) per-instance gradient Gram matrix [b, b].

    ``gram``: (K + lambda I)^-1 diag(K)^1/2. Under ``sync="global"`` K is block-diagonal over the
    ranks (cross-rank entries are not formed), so each rank solves its own block with the global
    ridge; the weights are then normalized over the global batch. ``gradnorm``: sqrt(diag K) = ||g_i||.
    """
    diag = gram.diagonal().clamp_min(0)
    if options.score == "gradnorm":
        return diag.sqrt()
    total = reducer.sum_(
        torch.stack([diag.sum(), torch.tensor(float(diag.numel()), dtype=diag.dtype, device=diag.device)])
    )
    return solve_gram(gram, total[0] / total[1], options.gram_ridge)


@dataclass
class Weights:
    """The delta weights of this rank's instances and whether they fell back to uniform."""

    delta: Tensor
    fallback: bool


def uniform_weights(n_local: int, device: torch.device, reducer: Reducer) -> Weights:
    """1 / N for each instance, N the global batch size."""
    count = reducer.sum_(torch.tensor([float(n_local)], device=device))
    total = int(count.item())
    return Weights(torch.full((n_local,), 1.0 / total, device=device), fallback=False)


def compute_weights(scores: Tensor, options: DeltaWeights, reducer: Reducer) -> Weights:
    """delta on the simplex from scores; never NaN: unusable scores fall back to uniform.

    ``softmax``: delta = softmax(s / (tau * mean|s|)); ``linear``: delta proportional to max(s, 0).
    With ``mix`` > 0 the result is mix * uniform + (1 - mix) * delta.
    """
    s = scores if scores.dtype == torch.float64 else scores.float()  # float64 scores (a float64 model's) stay
    n = s.numel()
    # One collective for every normalizer this rule needs: [count, non-finite count, sum|s|, sum max(s,0)].
    finite = torch.isfinite(s)
    safe = torch.where(finite, s, torch.zeros_like(s))
    stats = torch.stack(
        [
            torch.tensor(float(n), device=s.device),
            (~finite).sum().float(),
            safe.abs().sum(),
            safe.clamp_min(0).sum(),
        ]
    )
    stats = reducer.sum_(stats)
    total, nonfinite, abs_sum, pos_sum = (float(v) for v in stats.tolist())
    uniform = torch.full_like(s, 1.0 / total)
    mean_abs = abs_sum / total
    if nonfinite > 0 or not mean_abs > 0:
        return Weights(uniform, fallback=True)
    if options.weights == "linear":
        if not pos_sum > 0:
            return Weights(uniform, fallback=True)
        delta = s.clamp_min(0) / pos_sum
    else:
        logits = s / (options.temperature * mean_abs)
        top = reducer.max_(logits.max().reshape(1))
        expo = torch.exp(logits - top)
        denom = reducer.sum_(expo.sum().reshape(1))
        delta = expo / denom
    if options.mix > 0:
        delta = options.mix * uniform + (1.0 - options.mix) * delta
    return Weights(delta, fallback=False)


def weight_stats(delta: Tensor, reducer: Reducer) -> tuple[float, float]:
    """(entropy, max) of the global weight vector, each rank holding its slice."""
    d = delta.float()
    ent = -(d * torch.log(d.clamp_min(torch.finfo(d.dtype).tiny))).sum().reshape(1)
    ent = reducer.sum_(ent)
    top = reducer.max_(d.max().reshape(1)) if d.numel() else reducer.max_(d.new_zeros(1))
    return float(ent.item()), float(top.item())
