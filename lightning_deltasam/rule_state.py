"""The ascent rule's per-parameter state in a checkpoint, keyed by parameter name (or, where no name is known, by
position among every parameter of ``param_groups``, trainable or not): freezing or unfreezing a layer between save
and load never hands a tensor's state to another."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .distributed import local_tensor

State = dict[Tensor, dict[str, Tensor]]


def parameter_keys(param_groups: list[dict[str, Any]], names: dict[int, str]) -> dict[str, Tensor]:
    """Key -> parameter: its name in the model, else ``param_groups.<group>.<index>``."""
    keys: dict[str, Tensor] = {}
    for g, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            keys[names.get(id(p), f"param_groups.{g}.{i}")] = p
    return keys


def save_rule_state(state: State, param_groups: list[dict[str, Any]], names: dict[int, str]) -> dict[str, Any]:
    return {
        key: {k: v.clone() for k, v in state[p].items()}
        for key, p in parameter_keys(param_groups, names).items()
        if p in state
    }


def load_rule_state(saved: dict[Any, Any], param_groups: list[dict[str, Any]], names: dict[int, str]) -> State:
    """The state of ``saved`` on this optimizer's parameters; refuses a key it does not hold, or a shape that differs,
    naming the parameter (a checkpoint of another model, or of a renamed one)."""
    keys = parameter_keys(param_groups, names)
    if any(isinstance(k, int) for k in saved):  # written before names: positions among the trainable parameters
        trainable = [p for p in keys.values() if p.requires_grad]
        saved = {k: v for k, v in saved.items() if int(k) < len(trainable)}
        pairs = [(trainable[int(k)], v, str(k)) for k, v in saved.items()]
    else:
        missing = sorted(set(saved) - set(keys))
        if missing:
            raise ValueError(
                f"The checkpoint holds the SAM rule's state of parameter {missing[0]!r}, which this optimizer does not "
                f"hold (its parameters: {', '.join(list(keys)[:5])}, ...). Load it into the model it was saved from."
            )
        pairs = [(keys[k], v, k) for k, v in saved.items()]
    state: State = {}
    for p, values, key in pairs:
        local = local_tensor(p)
        for name, v in values.items():
            if v.shape != local.shape:
                raise ValueError(
                    f"The checkpoint's SAM rule state {name!r} of parameter {key!r} has shape {tuple(v.shape)}, "
                    f"the parameter {tuple(local.shape)}: it is not this model's."
                )
        state[p] = {name: v.to(local.device, local.dtype).clone() for name, v in values.items()}
    return state
