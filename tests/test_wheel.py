"""The built wheel, installed with only the core dependencies, is the library a user depends on.

The wheel is built from a copy of the package's files (nothing is written into the checkout), then installed in a
fresh virtual environment without the system's site packages: torch (``pip install torch==2.13.0``, as CI does),
then the wheel, which brings Lightning and typing_extensions. There, ``import lightning_deltasam`` and README's
three adapter examples must work, and none of the app's packages may be present. About a minute, most of it
installing torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP_ONLY = ("hydra", "transformers", "tensorboard", "matplotlib", "omegaconf")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "lightning_deltasam", src / "lightning_deltasam", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)])
    (built,) = out.glob("lightning_deltasam-*.whl")
    return built


def test_wheel_holds_the_package_data(wheel: Path) -> None:
    import lightning_deltasam

    names = set(zipfile.ZipFile(wheel).namelist())
    assert "lightning_deltasam/py.typed" in names
    assert "lightning_deltasam/glue/conf/config.yaml" in names
    shipped = {n for n in names if n.startswith("lightning_deltasam/glue/conf/") and n.endswith(".yaml")}
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "lightning_deltasam" / "glue" / "conf").rglob("*.yaml")}
    assert shipped == on_disk
    assert f"lightning_deltasam-{lightning_deltasam.__version__}-" in wheel.name  # the version has one source
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = re.findall(r"^Requires-Dist: ([\w-]+)(.*)$", metadata, flags=re.M)
    core = sorted(name.lower().replace("_", "-") for name, rest in requires if "extra ==" not in rest)
    assert core == ["lightning", "torch", "typing-extensions"], core
    assert "Provides-Extra: app" in metadata and "Provides-Extra: dev" in metadata


def readme_adapter_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_core_install_runs_the_readme_adapters(wheel: Path, tmp_path: Path) -> None:
    examples = readme_adapter_examples()
    assert len(examples) == 3 and all(
        n in "".join(examples) for n in ("DeltaSAM(", "DeltaSAMMixin", "DeltaSAMCallback")
    )
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])  # no system site packages
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    pip = [python, "-m", "pip", "install", "-q"]
    _run([*pip, "torch==2.13.0"], env=env, cwd=tmp_path)
    _run([*pip, str(wheel)], env=env, cwd=tmp_path)
    present = _run(
        [python, "-c", f"import importlib.util as u; print([m for m in {APP_ONLY!r} if u.find_spec(m)])"],
        env=env,
        cwd=tmp_path,
    ).stdout.strip()
    assert present == "[]", f"the core install brought app packages: {present}"
    shown = _run(
        [python, "-c", "import lightning_deltasam as d; print(d.__file__, d.__version__)"], env=env, cwd=tmp_path
    ).stdout
    assert str(venv) in shown, f"imported from outside the fresh environment: {shown}"
    for i, code in enumerate(examples):
        script = tmp_path / f"example{i}.py"
        script.write_text(code)
        out = _run([python, str(script)], env=env, cwd=tmp_path).stdout
        assert re.search(r"per-instance losses|trained 50 steps", out), out
