"""README's library snippets run as written (in order, one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_snippets_run(monkeypatch, tmp_path):
    text = README.read_text()
    section = text.split("## Library usage", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)  # Lightning writes lightning_logs/ here
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["losses"].shape == (64,)
    assert isinstance(namespace["Classifier"](), L.LightningModule)
