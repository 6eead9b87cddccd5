"""Export only writes, loading only reads (issue 10, item 4): nothing under ``oqcore/loading``
imports :mod:`oqcore.export`, at module or function level; :mod:`oqcore.export` imports neither
reader (:mod:`oqcore.loading.saved`, :mod:`oqcore.loading.online`); the format facts both sides
need live in the leaf :mod:`oqcore.saved_format`. Read from the AST, so a function-level import
(the kind that hid the old export <-> loading.online cycle) counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "oqcore"


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every ``oqcore`` module ``path`` (a file under the package folder ``root``) imports
    anywhere (absolute names; ``from x import y`` counted as ``x`` and as ``x.y``, since ``y``
    may be a submodule)."""
    package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m == "oqcore" or m.startswith("oqcore.")}


def _imports(path: Path, module: str, root: Path = ROOT) -> bool:
    return any(m == module or m.startswith(module + ".") for m in imported_modules(path, root))


@pytest.mark.parametrize("path", sorted((ROOT / "loading").glob("*.py")), ids=lambda p: p.name)
def test_loading_never_imports_export(path):
    assert not _imports(path, "oqcore.export"), f"{path.name} imports oqcore.export (loading only reads)"


@pytest.mark.parametrize("reader", ["oqcore.loading.saved", "oqcore.loading.online"])
def test_export_never_imports_a_reader(reader):
    assert not _imports(ROOT / "export.py", reader), f"oqcore/export.py imports {reader} (export only writes)"


def test_saved_format_is_a_leaf():
    assert imported_modules(ROOT / "saved_format.py") == set()


def test_the_check_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "oqcore" / "loading"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("def f():\n    from ..export import save_quantized\n")
    assert _imports(f, "oqcore.export", root=tmp_path / "oqcore")
    f.write_text("import oqcore.loading.saved\n")
    assert not _imports(f, "oqcore.export", root=tmp_path / "oqcore")
