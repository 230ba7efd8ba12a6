"""Details of the app a user meets: what README's example shows, error wording, what git tracks."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lightning_deltasam.glue.tasks import tsv_task

from .test_glue import FIXTURES, write_rows

REPO = Path(__file__).resolve().parents[1]


def test_readme_example_json_has_every_key_the_app_writes(tmp_path: Path) -> None:
    """A 2-step SST-2 run on fixture rows: each top-level key of its results.json is in the app guide's example line."""
    from hydra import compose, initialize_config_dir

    from lightning_deltasam.glue.app import run

    for file, rows in FIXTURES["SST-2"].items():
        write_rows(tmp_path / "glue" / "SST-2" / file, rows)
    from lightning_deltasam.glue.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"task.data_dir={tmp_path / 'glue'}",
                "model=tiny",
                "optimizer=sam",
                "trainer.max_steps=2",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                "logger.tensorboard=null",
                f"paths.output_dir={tmp_path / 'out'}",
            ],
        )
        results = run(cfg)
    example = (REPO / "docs" / "app.md").read_text().split('```text\n{"task"', 1)[1].split("```", 1)[0]
    example = '{"task"' + example
    top_level = re.sub(r"\{[^{}]*\}", "{}", example[1:])  # the nested option dicts: their keys are not top level
    shown = re.findall(r'"([\w/]+)": ', top_level)
    assert shown == list(results), "docs/app.md's example results.json: keys (in order) differ from the app's"


def test_a_column_missing_from_the_header_is_two_sentences(tmp_path: Path) -> None:
    write_rows(tmp_path / "train.tsv", [["text", "gold"], ["fine", "pos"]])
    with pytest.raises(ValueError) as err:
        tsv_task(str(tmp_path), text_columns=["zzz"], label_column="gold").load("train")
    assert "['text', 'gold']. Set task.text_columns to one of them" in str(err.value)


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_conf_config_yaml_is_not_ignored() -> None:
    """The app's main config is tracked; no ignore rule may hide it (``git check-ignore`` exits 1: not ignored)."""
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", "-v", "lightning_deltasam/glue/conf/config.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stdout
