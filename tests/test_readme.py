"""README as a new user reads it: every library snippet runs on its own, in a fresh interpreter, and says it
worked; the defaults the Configuration section states are the composed config's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightning_deltasam.glue.cli import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()


def section(title: str) -> str:
    return TEXT.split(f"\n{title}\n", 1)[1].split("\n## ", 1)[0]


LIBRARY_SNIPPETS = re.findall(r"```python\n(.*?)```", section("## Library usage"), flags=re.S)


def test_library_section_has_five_snippets() -> None:
    assert len(LIBRARY_SNIPPETS) == 5


@pytest.mark.parametrize("index, shows", [(0, "per-instance losses (64,)"), (1, "mixin: trained 50 steps"),
                                          (2, "callback: trained 50 steps"), (3, "skipped False"),
                                          (4, "exact delta-SAM step: mean loss")])
def test_readme_snippet_runs_alone(index: int, shows: str, tmp_path: Path) -> None:
    """Exactly as printed, in a fresh interpreter (no imports borrowed from an earlier snippet)."""
    script = tmp_path / "snippet.py"
    script.write_text(LIBRARY_SNIPPETS[index])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shows in proc.stdout


def _value(text: str):
    """A README value (``400``, ``null``, ``1e-4``, ``norm``) as the config would hold it."""
    loaded = yaml.safe_load(text)
    if isinstance(loaded, str):
        try:
            return float(loaded)
        except ValueError:
            return loaded
    return loaded


def _same(documented, actual) -> bool:
    if isinstance(actual, (int, float)) and not isinstance(actual, bool) and isinstance(documented, (int, float)):
        return float(actual) == float(documented)
    return documented == actual


def documented_defaults() -> list[tuple[str, str]]:
    """Every ``group.key=value`` in the Configuration bullets that state defaults, and the default-budget paragraph."""
    config = section("## Configuration")
    bullets = [b for b in re.split(r"\n\* ", config) if b.startswith(("**Classifier.**", "**Data.**", "**Trainer.**",
                                                                      "**Logging and checkpoints.**"))]
    assert len(bullets) == 4
    budget = TEXT.split("The default budget is", 1)[1].split("\n\n", 1)[0]
    pattern = r"`((?:task|data|model|classifier|optimizer|trainer|callbacks|logger)\.[\w.]+)=([^`]+)`"
    return [pair for text in [*bullets, budget] for pair in re.findall(pattern, text)]


def test_documented_defaults_match_the_config(tmp_path: Path) -> None:
    pairs = documented_defaults()
    keys = {k for k, _ in pairs}
    assert {"trainer.max_steps", "trainer.val_check_interval", "trainer.max_epochs", "data.batch_size",
            "data.label_noise", "callbacks.model_checkpoint.save_top_k"} <= keys
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={tmp_path}"])
    for key, text in pairs:
        actual = OmegaConf.select(cfg, key, default="<absent>")
        assert _same(_value(text), actual), f"README says {key}={text}, the config has {actual!r}"


def test_tsv_options_table_matches_the_config() -> None:
    table = section("### Your own data: `task=tsv`")
    rows = re.findall(r"^\| `task\.(\w+)` \| (.+?) \|", table, flags=re.M)
    assert len(rows) >= 10
    tsv = OmegaConf.load(CONF_DIR / "task" / "tsv.yaml")
    for key, default in rows:
        default = default.strip()
        if default == "required":
            assert OmegaConf.is_missing(tsv, key), key
            continue
        actual = OmegaConf.to_container(tsv)[key]
        documented = "\t" if default == '`"\\t"`' else _value(default.strip("`"))
        if isinstance(actual, (list, dict)):
            assert default.strip("`").replace(" ", "") == str(actual).replace("'", "").replace(" ", ""), key
        else:
            assert _same(documented, actual), f"README says task.{key}={default}, the config has {actual!r}"


def test_no_pointer_to_a_table_above() -> None:
    assert "options table above" not in TEXT and "(#options-the-same-for-all-three-adapters)" in TEXT
    assert "### Options (the same for all three adapters)" in TEXT


def test_install_note_names_both_wheels() -> None:
    install = section("## Install")
    assert "--index-url https://download.pytorch.org/whl/cpu" in install and "CUDA" in install
