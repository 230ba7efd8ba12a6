"""Architecture suite: on every zoo model (tests/architectures.py), the per-instance route (m=1, m=2)
and the exact Gram rule either equal a loop over instances to 1e-6 (relative, float64) or refuse explicitly, with
an error from the library that names a submodule or parameter of the model. A silent difference fails, and so does
an exception from inside transformers / torch (or one from the library that names nothing).

Run: ``OMP_NUM_THREADS=1 pytest -m architectures tests/test_architectures.py``; the table of outcomes:
``python benchmarks/architectures.py``.
"""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("transformers")

from tests.architectures import MODES, TOLERANCE, ZOO, run_case  # noqa: E402

pytestmark = pytest.mark.architectures


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(ZOO))
def test_step_equals_the_loop_or_refuses_by_name(name, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = run_case(name, mode)
    if outcome.kind == "equal":
        return
    if outcome.kind == "refused":
        assert outcome.named  # the message names a part of the model
        return
    if outcome.kind == "silent":
        pytest.fail(
            f"{name}, {mode}: the step differs from the loop over instances by {outcome.rel:.2e} "
            f"(relative; tolerance {TOLERANCE:g}) without an error"
        )
    if outcome.kind == "vague":
        pytest.fail(
            f"{name}, {mode}: the library raised {outcome.exc_type} at {outcome.where}, but not as an explicit "
            f"refusal (ValueError/TypeError/RuntimeError/NotImplementedError naming a submodule or parameter): "
            f"{outcome.message[:300]}"
        )
    pytest.fail(
        f"{name}, {mode}: crash outside the library, {outcome.exc_type} at {outcome.where}: {outcome.message[:300]}"
    )


def test_the_verdicts_tell_outcomes_apart():
    """The harness itself: a refusal from outside the library is a crash, a silent change is caught, names match."""
    import torch
    from torch import nn

    from tests.architectures import names_model_part, per_instance_reference, rel_error

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    assert names_model_part("cannot take 0.weight (Linear)", model) == "0.weight"
    assert names_model_part("weights are not supported", model) is None  # no model name in it
    assert names_model_part("0 (Linear) was called twice", model) == "0"
    assert names_model_part("layer 0 is odd", model) is None  # an undotted name needs the "name (Class)" form
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1, 1])

    def loss(b):
        return nn.functional.cross_entropy(model(b[0]), b[1], reduction="none")

    sam = per_instance_reference(model, loss, (x, y), 0.05, 5)  # one group: SAM
    inst = per_instance_reference(model, loss, (x, y), 0.05, 1)
    assert rel_error(sam, inst) > 1e-3  # the references tell SAM and per-instance SAM apart
    assert rel_error(inst, inst) == 0.0


@pytest.mark.parametrize("name", ["llama-lm-tied", "gemma", "gpt2-lm-tied", "t5", "vit", "resnet"])
def test_every_parameter_trains_with_m1_equal_to_the_loop_over_three_steps(name):
    """Llama (RMSNorm, tied head), Gemma (scaled embedding, 1 + w norms), GPT-2 (Conv1D, tied head), T5 (its
    shared embedding and RMSNorm; the relative-attention tables, computed once for the batch, frozen), ViT (Conv2d
    patches; its raw cls_token and position_embeddings, no layer kind, frozen) and a ResNet (Conv2d; its BatchNorm
    affine frozen: transformers' ResNet modifies that output in place, refused by name): three SGD steps of m=1 against three steps on the loop."""
    import torch

    from lightning_deltasam import DeltaSAM, SAMConfig
    from tests.architectures import per_instance_reference, trainable

    def build():  # the builders are seeded: each call gives the same weights, with its own loss closure
        model, batch, loss = ZOO[name]()
        frozen = {"t5": ("relative_attention_bias",), "vit": ("cls_token", "position_embeddings")}.get(name, ())
        for key, p in model.named_parameters():
            p.requires_grad_(not any(part in key for part in frozen))
        for sub in model.modules():  # transformers' ResNet adds the residual onto the BatchNorm's output in place
            if isinstance(sub, torch.nn.BatchNorm2d):
                sub.requires_grad_(False)
        return model, batch, loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, batch, loss = build()
        twin, _, twin_loss = build()
        start = {k: v.detach().clone() for k, v in trainable(model).items()}
        params = [p for p in model.parameters() if p.requires_grad]
        opt = DeltaSAM(params, torch.optim.SGD, SAMConfig(m=1), lr=0.5, module=model)
        for _ in range(3):
            opt.step(lambda: loss(batch))
            grads = per_instance_reference(twin, twin_loss, batch, 0.05, 1)
            with torch.no_grad():
                for p, g in zip(trainable(twin).values(), grads.values()):
                    p.sub_(0.5 * g)
    mine, ref = trainable(model), trainable(twin)
    num = sum(float((mine[k] - ref[k]).double().square().sum()) for k in ref)
    den = sum(float((ref[k] - start[k]).double().square().sum()) for k in ref)
    assert (num / den) ** 0.5 < TOLERANCE  # relative to how far the loop moved the weights
    assert all(not torch.equal(mine[k], start[k]) for k in mine)  # every trainable parameter moved
