"""README.md and docs/ as a reader uses them: every fenced code block is executed according to its language,
and the defaults the app guide states are the composed config's.

- ``python``: run as a script in a fresh interpreter (no imports borrowed from another block); it must exit 0,
  and every ``print(...)  # text`` line must print ``text`` (the parts between ``...`` in order).
- ``bash``: each command is checked without its side effects (see :func:`check_command`); an unknown kind of
  command fails the test until this file learns it.
- ``text``: output, signatures and trees: shown, not run.

A block preceded by ``<!-- not-run: reason -->`` is skipped with that reason.
"""

from __future__ import annotations

import ast
import functools
import io
import itertools
import os
import re
import shlex
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("hydra")  # the bash blocks compose the app's config: the [app] extra

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from lightning_deltasam.glue.cli import CONF_DIR, OptionError, check_overrides

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "text", "diff"}
CI = (ROOT / ".ci" / "run").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    language: str
    code: str
    skip: str | None  # the reason given in <!-- not-run: reason -->, if any

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for match in re.finditer(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", text, flags=re.S | re.M):
        before = text[: match.start()].rstrip().splitlines()
        skip = re.fullmatch(r"<!-- not-run: (.+) -->", before[-1].strip()) if before else None
        found.append(
            Block(
                str(path.relative_to(ROOT)),
                text.count("\n", 0, match.start()) + 1,
                match.group(1).strip(),
                match.group(2),
                skip.group(1) if skip else None,
            )
        )
    return found


ALL = [b for page in PAGES for b in blocks(page)]
RUN = [b for b in ALL if b.skip is None]


def test_every_block_names_a_known_language() -> None:
    assert len(ALL) > 20, "found too few code blocks: the fence pattern is broken"
    unknown = [f"{b} ```{b.language}" for b in ALL if b.language not in LANGUAGES]
    assert not unknown, f"code blocks need one of {sorted(LANGUAGES)} (add a check here for a new one): {unknown}"


def test_skipped_blocks_give_a_reason() -> None:
    assert all(len(b.skip.split()) >= 3 for b in ALL if b.skip), "a not-run marker needs a reason of a few words"


# --------------------------------------------------------------------------- python
def expected_output(code: str) -> list[list[str]]:
    """The comment closing each ``print(...)`` call (on the line where the call ends, so a call the formatter
    wrapped still counts), split at ``...`` into parts that must appear in order."""
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(code).readline)
        if tok.type == tokenize.COMMENT
    }
    calls = [
        node
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]
    texts = [comments[call.end_lineno] for call in calls if call.end_lineno in comments]
    return [[part.strip() for part in text.split("...") if part.strip()] for text in texts]


def test_expected_output_survives_wrapping() -> None:
    code = 'x = 1\nprint(\n    f"value {x}, done"\n)  # value 1, ... done\nprint("quiet")\n'
    assert expected_output(code) == [["value 1,", "done"]]


def appears_in_order(parts: list[str], text: str) -> bool:
    position = 0
    for part in parts:
        position = text.find(part, position)
        if position < 0:
            return False
        position += len(part)
    return True


def test_appears_in_order() -> None:
    assert appears_in_order(["loss at w + eps", ", skipped False"], "loss at w + eps 0.7, skipped False")
    assert not appears_in_order(["skipped False", "loss"], "loss 0.7, skipped False")


PYTHON = [b for b in RUN if b.language == "python"]


def test_python_blocks_state_their_output() -> None:
    assert len(PYTHON) >= 8
    silent = [str(b) for b in PYTHON if not expected_output(b.code)]
    assert not silent, f"a python block must end with print(...)  # what it prints: {silent}"


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_python_block_runs_alone(block: Block, tmp_path: Path) -> None:
    """Exactly as printed, in a fresh interpreter, from an empty folder."""
    script = tmp_path / "block.py"
    script.write_text(block.code)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{block} failed:\n{proc.stderr[-3000:]}"
    for parts in expected_output(block.code):
        assert appears_in_order(parts, proc.stdout), (
            f"{block} should print {' ... '.join(parts)!r}; it printed:\n{proc.stdout}"
        )


# --------------------------------------------------------------------------- bash
def commands(code: str) -> list[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [args for line in joined.splitlines() if (args := shlex.split(line, comments=True))]


def without_env(args: list[str]) -> list[str]:
    """``GLUE_DIR=x python ...`` -> ``python ...``."""
    while args and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", args[0]):
        args = args[1:]
    return args


@functools.cache
def _compose(overrides: tuple[str, ...]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def check_app_command(overrides: list[str]) -> None:
    """The overrides name options the config has, and compose (each swept value in turn) into a config whose
    optimizer options are valid."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lightning_deltasam.glue.app import optimizer_options

    overrides = [o for o in overrides if o not in ("-m", "--multirun")]
    assert not [o for o in overrides if o.startswith("-")], f"unchecked flags in {overrides}"
    check_overrides(overrides)
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for text, override in zip(overrides, parsed):
        if override.is_sweep_override():
            key = text.split("=", 1)[0]
            choices.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([text])
    for combo in itertools.product(*choices):
        cfg = _compose(tuple(o for o in combo if not o.startswith(("hydra.", "ckpt_path="))))
        optimizer_options(cfg)


def extras_of(requirement: str) -> set[str]:
    match = re.fullmatch(r"(?:\.|lightning-deltasam)(?:\[([\w,]+)\])?", requirement)
    assert match, requirement
    return set(match.group(1).split(",")) if match.group(1) else set()


def check_pip_install(args: list[str]) -> None:
    """Extras the project defines; a torch version the project allows; any other package: one CI installs."""
    values_of = {"--index-url", "--extra-index-url", "-i", "-c", "-r"}
    rest = [a for i, a in enumerate(args) if not a.startswith("-") and args[i - 1] not in values_of]
    assert rest, f"pip install of nothing: {args}"
    for requirement in rest:
        if requirement.startswith(".") or requirement.startswith("lightning-deltasam"):
            unknown = extras_of(requirement) - set(PYPROJECT["project"]["optional-dependencies"])
            assert not unknown, f"pip install {requirement}: no such extra {sorted(unknown)}"
        elif requirement.startswith("torch"):
            version = Version(requirement.split("==", 1)[1])
            declared = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
            assert version in declared.specifier, f"{requirement} is outside the declared {declared}"
        else:
            assert f"pip install -q --no-deps {requirement}" in CI or f"install -q {requirement}" in CI, (
                f"pip install {requirement}: .ci/run installs no such package, so nothing proves the name"
            )


@functools.cache
def benchmark_help(script: str) -> str:
    proc = subprocess.run(
        [sys.executable, script, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def check_command(args: list[str]) -> None:
    """One command of a bash block, checked without its side effects."""
    args = without_env(args)
    name = args[0]
    if name == "export":
        assert all(re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S+", a) for a in args[1:]), args
    elif args[:2] == ["python", "train.py"]:
        check_app_command(args[2:])
    elif args[:3] == ["python", "-m", "lightning_deltasam.glue"] or name == "deltasam-train":
        check_app_command(args[3:] if name == "python" else args[1:])
    elif args[:3] == ["python", "-m", "pytest"]:
        assert shlex.join(args) in CI, f"{shlex.join(args)}: not the test command .ci/run runs"
    elif args[:2] == ["pip", "install"] or args[:4] == ["python", "-m", "pip", "install"]:
        check_pip_install(args[2:] if name == "pip" else args[4:])
    elif name in ("ruff", "mypy", "mkdocs"):
        assert shlex.join(args) in CI, f"{shlex.join(args)}: not a check .ci/run runs"
    elif name == "pre-commit":
        assert (ROOT / ".pre-commit-config.yaml").is_file() and args[1] in ("install", "run"), args
    elif name == "python" and args[1].startswith("benchmarks/") and args[1].endswith(".py"):
        options = benchmark_help(args[1])
        for flag in (a.split("=", 1)[0] for a in args[2:] if a.startswith("--")):
            assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", options), f"{args[1]} has no option {flag}"
    else:
        raise AssertionError(f"no check for this kind of command: {shlex.join(args)}")


def test_check_command_can_fail() -> None:
    for bad in (
        ["python", "train.py", "optimizer.rh=0.1"],
        ["python", "train.py", "optimizer.rho=-1"],
        ["python", "train.py", "-m", "optimizer=adamw,sgd"],
        ["pip", "install", ".[nosuch]"],
        ["pip", "install", "torch==2.1.0"],
        ["pip", "install", "somepackage"],
        ["ruff", "check", "--fix"],
        ["make", "all"],
        ["python", "benchmarks/speed.py", "--no-such-flag"],
    ):
        with pytest.raises((AssertionError, OptionError, ValueError)):
            check_command(bad)


BASH = [b for b in RUN if b.language == "bash"]


@pytest.mark.parametrize("block", BASH, ids=str)
def test_bash_block_commands_are_valid(block: Block) -> None:
    cmds = commands(block.code)
    assert cmds, f"{block} has no command"
    for args in cmds:
        try:
            check_command(args)
        except (AssertionError, OptionError, ValueError) as err:
            raise AssertionError(f"{block}: {shlex.join(args)}: {err}") from err


# --------------------------------------------------------------------------- what the app guide states
APP = (ROOT / "docs" / "app.md").read_text()


def section(text: str, title: str) -> str:
    return text.split(f"\n{title}\n", 1)[1].split("\n## ", 1)[0]


def _value(text: str):
    """A documented value (``400``, ``null``, ``1e-4``, ``norm``) as the config would hold it."""
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
    config = section(APP, "## Configuration")
    bullets = [
        b
        for b in re.split(r"\n\* ", config)
        if b.startswith(("**Classifier.**", "**Data.**", "**Trainer.**", "**Logging and checkpoints.**"))
    ]
    assert len(bullets) == 4
    budget = APP.split("The default budget is", 1)[1].split("\n\n", 1)[0]
    pattern = r"`((?:task|data|model|classifier|optimizer|trainer|callbacks|logger)\.[\w.]+)=([^`]+)`"
    return [pair for text in [*bullets, budget] for pair in re.findall(pattern, text)]


def test_documented_defaults_match_the_config(tmp_path: Path) -> None:
    pairs = documented_defaults()
    keys = {k for k, _ in pairs}
    assert {
        "trainer.max_steps",
        "trainer.val_check_interval",
        "trainer.max_epochs",
        "data.batch_size",
        "data.label_noise",
        "callbacks.model_checkpoint.save_top_k",
    } <= keys
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={tmp_path}"])
    for key, text in pairs:
        actual = OmegaConf.select(cfg, key, default="<absent>")
        assert _same(_value(text), actual), f"docs/app.md says {key}={text}, the config has {actual!r}"


def test_tsv_options_table_matches_the_config() -> None:
    table = section(APP, "## Your own data: `task=tsv`")
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
            assert _same(documented, actual), f"docs/app.md says task.{key}={default}, the config has {actual!r}"


def test_options_table_lists_every_option() -> None:
    """The library guide's options table: every SAMConfig field, with its default."""
    from dataclasses import MISSING, fields

    from lightning_deltasam import SAMConfig

    library = (ROOT / "docs" / "library.md").read_text()
    table = section(library, "## Options (the same for all three adapters)")
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", table, flags=re.M))
    for f in fields(SAMConfig):
        assert f.name in rows, f"docs/library.md's options table has no row for {f.name}"
        if f.default_factory is not MISSING:  # a rule's options: shown as its constructor call
            assert rows[f.name].strip().strip("`") == f"{type(f.default_factory()).__name__}()", f.name
            continue
        default = f.default if f.default is not MISSING else None
        shown = rows[f.name].strip().strip("`").strip('"')
        documented = None if shown == "None" else _value(shown)
        assert _same(documented, default), (
            f"docs/library.md says {f.name} defaults to {rows[f.name]}, SAMConfig: {default!r}"
        )


def test_install_note_names_both_wheels() -> None:
    index = (ROOT / "docs" / "index.md").read_text()
    install = section(index, "## Install")
    assert "--index-url https://download.pytorch.org/whl/cpu" in install and "CUDA" in install


def test_readme_is_a_quickstart() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in ("docs/algorithm.md", "docs/library.md", "docs/app.md", "docs/results.md"):
        assert f"({page}" in readme, f"README links to {page}"


def test_docs_refer_to_nothing_outside_the_repository() -> None:
    """No shared folder, sibling checkout or issue tracker: a reader of the repository has none of them."""
    pattern = re.compile(r"\.\./shared|shared folder|DELTASAM\.md|/work/|\bissues? #?\d+|the issue's", re.I)
    checked = [
        *PAGES,
        ROOT / "CHANGELOG.md",
        *sorted((ROOT / "lightning_deltasam").rglob("*.py")),
        *sorted((ROOT / "lightning_deltasam").rglob("*.yaml")),
        ROOT / "train.py",
        ROOT / "pyproject.toml",
        *sorted((ROOT / "benchmarks").glob("*.py")),
        ROOT / "benchmarks" / "RESULTS.md",
        *sorted((ROOT / "tests").glob("*.py")),
    ]
    found = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in checked
        if p != Path(__file__)
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "references to things outside the repository:\n" + "\n".join(found)


def test_every_rule_is_documented_from_its_own_file() -> None:
    """Each registered rule's options class is rendered in the library guide from its docstring, and that docstring
    documents every option it declares: a new option needs its file only, a new rule one ``:::`` line."""
    from dataclasses import fields

    from lightning_deltasam.options import VariantOptions, WeightingOptions

    library = (ROOT / "docs" / "library.md").read_text()
    for registry in (VariantOptions.registry, WeightingOptions.registry):
        for name, cls in registry.items():
            assert f"::: {cls.__module__}.{cls.__qualname__}" in library, f"docs/library.md does not render {name}"
            doc = "".join(c.__doc__ or "" for c in cls.__mro__)
            for f in fields(cls):
                assert re.search(rf"^\s+{f.name}:", doc, flags=re.M), (
                    f"{cls.__name__}'s docstring has no Args for {f.name}"
                )


@pytest.mark.parametrize("block", [b for b in RUN if b.language == "diff"], ids=str)
def test_diff_block_applies_to_the_code(block: Block, tmp_path: Path) -> None:
    """A worked example's diff (docs/development.md) still applies to the code as it is: the docs show real edits."""
    patch = tmp_path / "example.diff"
    patch.write_text(block.code if block.code.endswith("\n") else block.code + "\n")
    done = subprocess.run(["git", "apply", "--check", str(patch)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"{block}: the diff no longer applies: {done.stderr.strip()}"
