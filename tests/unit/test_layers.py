"""The package's shape: the layer contract holds and no private name crosses a package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_layer_contract_holds() -> None:
    """`.importlinter` states the stack (errors at the bottom, run at the top); an import
    that points up breaks it (`make lint`, `make test`)."""
    out = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 kept, 0 broken" in out.stdout


def _package(module: str) -> str:
    """``fints_repro.steering.methods.caa`` -> ``fints_repro.steering``; a top-level module
    is its own package."""
    return ".".join(module.split(".")[:2])


def _private_imports(path: Path, module: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fints_repro"):
            if node.module.startswith(_package(module)) and module.startswith("fints_repro"):
                continue
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}"
                      for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id.endswith("_mod"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {base.id}.{node.attr}")
    return found


def test_no_private_name_crosses_a_package() -> None:
    """Neither the package nor the scripts reach another package's ``_name``."""
    found = []
    for path in sorted((ROOT / "fints_repro").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found += _private_imports(path, module)
    for path in sorted((ROOT / "scripts").glob("*.py")):
        found += _private_imports(path, "scripts." + path.stem)
    assert found == []
