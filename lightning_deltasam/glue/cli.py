"""What ``train.py`` does around Hydra: check the command line's options before Hydra composes them (a
mistyped option is one ``error:`` line and exit status 2, with the closest valid names), name run
directories, and keep third-party noise off the console. Light: no torch or Lightning import at module level.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"  # package data: found from a checkout or an installed wheel
USER_ERROR_EXIT = 2


class OptionError(ValueError):
    """An option on the command line that the config does not have (or a choice a group does not offer)."""


# --------------------------------------------------------------------------- the command line's options
def config_groups(conf_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """Config group -> its options (``task`` -> ``[cola, mnli, ...]``), from the folders of ``conf/``."""
    return {
        d.name: sorted(f.stem for f in d.glob("*.yaml"))
        for d in sorted(conf_dir.iterdir())
        if d.is_dir() and not d.name.startswith((".", "_"))
    }


def _closest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)


def _suggest(word: str, candidates: Sequence[str], prefix: str = "", listing: str = "") -> str:
    """``; did you mean x? (listing: a, b, c)`` for an unknown ``word``."""
    close = _closest(word, candidates)
    text = f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
    if listing and candidates:
        shown = list(candidates)
        more = f", ... ({len(shown)} in all)" if len(shown) > 24 else ""
        text += f" ({listing}: {', '.join(shown[:24])}{more})"
    return text


def _node(cfg: Any, parts: Sequence[str]) -> tuple[Any, int]:
    """The deepest node of ``cfg`` along ``parts`` and how many parts exist (lists are not looked into)."""
    node = cfg
    for i, part in enumerate(parts):
        if isinstance(node, ListConfig):
            return node, len(parts)  # an index into a list value: not checked here
        if not isinstance(node, DictConfig) or part not in node.keys():
            return node, i
        node = node._get_node(part)
    return node, len(parts)


def _addable(cfg: DictConfig, parent: str) -> list[str] | None:
    """The names ``+<parent>.<name>=...`` may add; ``None``: anything (a new callback or logger entry)."""
    if parent in ("callbacks", "logger"):
        return None
    if parent in RULE_NODES:
        return _rule_options(cfg, parent)
    if parent == "optimizer":
        from ..config import SAMConfig

        return ["lr", "weight_decay", *SAMConfig.__dataclass_fields__]
    node = OmegaConf.select(cfg, parent) if parent else None
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if target is None:
        return []
    from hydra.utils import get_method

    try:
        params = inspect.signature(get_method(str(target))).parameters
    except Exception:  # noqa: BLE001 - a target that does not import is reported by the app itself
        return None
    names = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"]
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        if parent == "classifier":  # GlueClassifier passes **sam on to the mixin: the SAM options
            from ..config import SAMConfig

            return [
                *names,
                *SAMConfig.__dataclass_fields__,
                "gradient_clip_val",
                "gradient_clip_algorithm",
                "accumulate_grad_batches",
            ]
        return None
    return names


RULE_NODES = ("optimizer.variant", "optimizer.reweight")  # a rule's options: the ones its file declares


def _rule_options(cfg: DictConfig, parent: str) -> list[str]:
    """The options the rule chosen at ``parent`` (by its ``name``) declares, ``name`` included."""
    from dataclasses import fields

    from ..options import VariantOptions, WeightingOptions

    node = OmegaConf.select(cfg, parent)
    chosen = node.get("name") if isinstance(node, DictConfig) else None
    registry = (VariantOptions if parent.endswith("variant") else WeightingOptions).registry
    cls = registry.get(str(chosen))
    return ["name", *(f.name for f in fields(cls))] if cls is not None else []


def _group_choices(overrides: list[Any], groups: dict[str, list[str]]) -> list[str]:
    """The command line's config-group choices (``optimizer=gsam``), each checked against the group's files."""
    choices: list[str] = []
    for o in overrides:
        key = o.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or o.package is not None:
            continue
        if key in groups and not o.is_force_add():
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            for value in values:
                if value not in groups[key] and value != "null":
                    raise OptionError(
                        f"{key}={value}: no such {key} option" + _suggest(value, groups[key], listing=f"{key} options")
                    )
            if not o.is_delete():
                choices.append(f"{key}={values[0]}")
    return choices


def _homes(cfg: DictConfig, name: str, depth: int = 3) -> list[str]:
    """Where a top-level ``name`` is an option further down: ``rho`` -> ``optimizer.rho``, ``max_steps`` ->
    ``trainer.max_steps``; the optimizer's options count whether or not its file sets them."""
    found: list[str] = []

    def walk(node: DictConfig, prefix: str, level: int) -> None:
        for key in (str(k) for k in node.keys()):
            child = node._get_node(key)
            if key == name and prefix:
                found.append(prefix + key)
            if isinstance(child, DictConfig) and level < depth:
                walk(child, f"{prefix}{key}.", level + 1)

    walk(cfg, "", 0)
    if "optimizer" in cfg and f"optimizer.{name}" not in found and name in (_addable(cfg, "optimizer") or []):
        found.append(f"optimizer.{name}")
    return sorted(found, key=lambda path: not path.startswith("optimizer."))  # the option a user most likely meant


def _misplaced(key: str, sign: str, cfg: DictConfig) -> OptionError | None:
    """A top-level ``key`` that is an option of a group (``rho=0.1``): the error naming where it lives."""
    if "." in key:
        return None
    homes = _homes(cfg, key)
    if not homes:
        return None
    exists = {h for h in homes if OmegaConf.select(cfg, h, default="<absent>", throw_on_missing=False) != "<absent>"}
    shown = [("" if sign == "+" and h in exists else sign) + h for h in homes[:3]]
    return OptionError(
        f"unknown option {sign}{key} (a group's option, not a top-level one); did you mean {' or '.join(shown)}?"
    )


def check_overrides(args: Sequence[str], conf_dir: Path = CONF_DIR, config_name: str = "config") -> None:
    """Raise :class:`OptionError` (one line) for an unknown group option, an unknown key or a key that cannot be added.

    Every override is checked against the config composed with the command line's group choices:
    ``task=sst3``, ``optimizer.rh=0.1``, ``+optimizer.rh=0.1``, ``trainer.max_stepz=3``, ``~logger.csvv``.
    ``hydra.*`` overrides and anything Hydra's parser refuses are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides(list(args))
    except Exception:  # noqa: BLE001 - a syntax error: Hydra's own message says where
        return
    groups = config_groups(conf_dir)
    choices = _group_choices(overrides, groups)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(config_name, overrides=choices)
    for o in overrides:
        key = o.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or key in groups or o.is_force_add():
            continue
        parts = key.split(".")
        node, found = _node(cfg, parts)
        sign = "+" if o.is_add() else "~" if o.is_delete() else ""
        if found == len(parts):
            if o.is_add():
                raise OptionError(f"+{key}: {key} is already an option; set it without the +: {key}=...")
            continue
        parent = ".".join(parts[:found])
        misplaced = _misplaced(key, sign, cfg) if found == 0 else None
        if misplaced is not None:
            raise misplaced
        if o.is_add() and found == len(parts) - 1:
            allowed = _addable(cfg, parent)
            if allowed is None or parts[-1] in allowed:
                continue
            where = f"{parent} takes no {parts[-1]!r}" if parent else "the config has no such key"
            raise OptionError(
                f"unknown option {sign}{key} ({where})"
                + _suggest(parts[-1], allowed, prefix=f"{sign}{parent}.", listing=f"{parent} takes")
            )
        if parent in RULE_NODES and found == len(parts) - 1 and parts[-1] in _rule_options(cfg, parent) and not sign:
            raise OptionError(
                f"{key} is an option of the chosen {parts[1]} that this optimizer config does not list: set it "
                f"with +{key}=..."
            )
        siblings = [str(k) for k in node.keys() if not str(k).startswith("_")] if isinstance(node, DictConfig) else []
        where = f"{parent}." if parent else ""
        missing = "" if found == len(parts) - 1 else f" ({where}{parts[found]} is not in the config)"
        raise OptionError(
            f"unknown option {sign}{key}{missing}"
            + _suggest(parts[found], siblings, prefix=where, listing=f"{parent or 'top level'} has")
        )


def check_command_line(argv: Sequence[str] | None = None, conf_dir: Path = CONF_DIR) -> None:
    """Check ``sys.argv``'s overrides; on an unknown option print one ``error:`` line and exit with status 2.

    Hydra flags other than ``-m``/``--multirun`` (``--help``, ``--cfg``, ``-cn``, ...) leave the check to Hydra.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return
    try:
        check_overrides([a for a in argv if not a.startswith("-")], conf_dir)
    except OptionError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)


# --------------------------------------------------------------------------- run directory names
def _run_name(*, _root_: DictConfig) -> str:
    """``<task>-<model>-<optimizer>`` (``sst2-tiny-deltasam``); for ``task=tsv`` ``tsv-<data set's folder name>``."""
    choices = _root_.hydra.runtime.choices
    task = str(choices.get("task"))
    if task == "tsv":
        data_dir = OmegaConf.select(_root_, "task.data_dir", default=None, throw_on_missing=False)
        if data_dir:
            task = f"tsv-{Path(str(data_dir)).expanduser().resolve().name or 'data'}"
    return "-".join(str(part) for part in (task, choices.get("model"), choices.get("optimizer")) if part is not None)


def _swept(*, _root_: DictConfig) -> str:
    """A sweep job's folder: ``<num>_<swept key=value,...>`` (``0_optimizer=adamw,seed=1``); just ``<num>`` when
    the command line's sweeps cannot be read (another launcher)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    num = str(_root_.hydra.job.num)
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
        swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    except Exception:  # noqa: BLE001
        return num
    values = [o for o in _root_.hydra.overrides.task if o.split("=", 1)[0] in swept]
    name = ",".join(values).replace("/", "_")
    return f"{num}_{name}" if name else num


def register_resolvers() -> None:
    """``${run_name:}`` and ``${swept:}``, used by ``hydra.run.dir`` / ``hydra.sweep.subdir`` in ``conf/config.yaml``."""
    for name, fn in (("run_name", _run_name), ("swept", _swept)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=False)


# --------------------------------------------------------------------------- third-party noise
class _DropTips(logging.Filter):
    """Lightning's product adverts ("💡 Tip: ... litlogger / LitServe ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


_QUIET = False


def quiet_third_party() -> None:
    """Filter other projects' noise that says nothing about this run (never this project's own warnings).

    * torch's deprecation warning raised inside Lightning's ``_pytree`` (``isinstance(treespec, LeafSpec)``);
    * Lightning's "💡 Tip" adverts;
    * transformers' tqdm bar while loading pretrained weights;
    * Lightning's advice against ``DistributedSampler`` in ``trainer.validate()``: the app validates the final
      model under DDP on purpose (torchmetrics syncs the metric states across ranks).
    """
    global _QUIET
    if _QUIET:
        return
    _QUIET = True
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)
    warnings.filterwarnings(
        "ignore",
        message=r"Using `DistributedSampler` with the dataloaders\. During "
        r"`trainer\.validate\(\)`",
        category=Warning,
    )
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
