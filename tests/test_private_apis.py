"""Every private torch API the library calls is listed, with its reason and public fallback, in
docs/private-apis.md; and that list names nothing the library no longer calls."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_deltasam"
PAGE = ROOT / "docs" / "private-apis.md"


def _private(dotted: str) -> bool:
    parts = dotted.split(".")
    return parts[0] == "torch" and any(p.startswith("_") and not p.startswith("__") for p in parts[1:])


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def private_uses(source: str) -> set[str]:
    """Private torch names in ``source``: imported (``from torch._utils import x``) or reached by attribute
    (``torch._C._autograd._profiler_enabled``: the whole chain, not its prefixes)."""
    tree = ast.parse(source)
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            found |= {f"{node.module}.{a.name}" for a in node.names if _private(f"{node.module}.{a.name}")}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if _private(a.name)}
        elif isinstance(node, ast.Attribute) and id(node) not in inner:
            dotted = _dotted(node)
            if dotted and _private(dotted):
                found.add(dotted)
    return found


def library_uses() -> dict[str, set[str]]:
    """Private torch API -> the files of lightning_deltasam/ that call it."""
    uses: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in private_uses(path.read_text()):
            uses.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return uses


def listed() -> set[str]:
    table = PAGE.read_text().split("## torch", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([\w.]+)` \|", table, flags=re.M))


def test_every_private_torch_api_the_library_calls_is_listed() -> None:
    uses = library_uses()
    assert uses, "found no private torch API at all: the scan is broken"
    missing = {name: sorted(files) for name, files in uses.items() if name not in listed()}
    assert not missing, (
        f"private torch APIs called but not listed in docs/private-apis.md (add a row: why, and "
        f"the public fallback): {missing}"
    )


def test_the_list_names_only_what_is_called() -> None:
    stale = listed() - set(library_uses())
    assert not stale, f"docs/private-apis.md lists APIs the library no longer calls; remove their rows: {sorted(stale)}"


def test_no_private_use_escapes_the_scan() -> None:
    """A line with ``torch._``, ``torch.utils._`` or ``._C.`` in code is one the scan above has understood."""
    pattern = re.compile(r"\btorch\.(?:utils\.)?_[A-Za-z]|\._C\.")
    known = library_uses()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and not code.strip().startswith(('"', "'", "``")):
                assert any(rel in files and name.split(".")[-1] in code for name, files in known.items()), (
                    f"{rel}:{lineno} uses a private torch API the scan did not recognize: {line.strip()}"
                )


def test_the_scan_recognizes_each_form() -> None:
    """The scan itself, on the forms the library uses: it must be able to fail."""
    source = (
        "import torch\nfrom torch._utils import _flatten_dense_tensors\nfrom torch import nn\n"
        "torch._foreach_add_(a, b)\nif torch._C._autograd._profiler_enabled(): pass\n"
        "torch.utils._pytree.tree_leaves(x)\ntorch.linalg.vector_norm(x)\n"
    )
    assert private_uses(source) >= {
        "torch._utils._flatten_dense_tensors",
        "torch._foreach_add_",
        "torch._C._autograd._profiler_enabled",
        "torch.utils._pytree.tree_leaves",
    }
    assert "torch.linalg.vector_norm" not in private_uses(source)
