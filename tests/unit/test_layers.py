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


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _private_imports(source: str, where: str, module: str) -> list[str]:
    """Every ``_name`` of a fints_repro module of another package that ``source`` (the
    module ``module``) reaches: imported by name (``from fints_repro.x import _y``) or as
    an attribute of a module it bound (``import fints_repro.x as m; m._y``, ``from
    fints_repro import x; x._y``, ``fints_repro.x._y``)."""
    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    def foreign(target: str) -> bool:
        return not (module.startswith("fints_repro") and _package(target) == _package(module))

    tree = ast.parse(source, where)
    bound: dict[str, str] = {}  # local name -> fints_repro module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fints_repro"):
                    bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else "fints_repro"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fints_repro"):
            for a in node.names:
                target = f"{node.module}.{a.name}"
                if _is_module(target):
                    bound[a.asname or a.name] = target
                elif private(a.name) and foreign(node.module):
                    found.append(f"{where}:{node.lineno} {target}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            base = _dotted(node.value)
            if base is None:
                continue
            head, _, rest = base.partition(".")
            if head not in bound:
                continue
            target = bound[head] + (f".{rest}" if rest else "")
            if _is_module(target) and foreign(target):
                found.append(f"{where}:{node.lineno} {target}.{node.attr}")
    return found


def test_the_private_name_check_finds_each_way_of_reaching_one() -> None:
    ways = {
        "from fints_repro.models.loading import _file_sha256": "fints_repro.models.loading._file_sha256",
        "from fints_repro.models import loading\nloading._file_sha256": "fints_repro.models.loading._file_sha256",
        "import fints_repro.models.loading as lo\nlo._file_sha256": "fints_repro.models.loading._file_sha256",
        "import fints_repro.models.loading\nfints_repro.models.loading._file_sha256":
            "fints_repro.models.loading._file_sha256",
    }
    for source, want in ways.items():
        assert [f.split(" ", 1)[1] for f in _private_imports(source, "x.py", "fints_repro.steering.x")] == [want]
        assert _private_imports(source, "x.py", "fints_repro.models.other") == []  # same package


def test_no_private_name_crosses_a_package() -> None:
    """Neither the package nor the scripts reach another package's ``_name``."""
    found = []
    for path in sorted((ROOT / "fints_repro").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found += _private_imports(path.read_text(), str(path.relative_to(ROOT)), module)
    for path in sorted((ROOT / "scripts").glob("*.py")):
        found += _private_imports(path.read_text(), str(path.relative_to(ROOT)), "scripts." + path.stem)
    assert found == []
