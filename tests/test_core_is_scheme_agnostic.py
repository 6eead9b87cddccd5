"""The core holds no scheme: no quantized dtype, no format constant. If oqcore/ needed to know about
fp8 to work, the plugin contract would be wrong."""

import ast
from pathlib import Path

import oqcore

CORE = Path(oqcore.__file__).parent
SCHEME_DTYPES = {"int8", "uint8", "int4", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e8m0fnu"}
FORMAT_CONSTANTS = {448, 448.0, 127, 127.0, 127.5, 57344, 32, 128}


# The safetensors reader maps the file format's dtype tags (I8, U8, F8_E4M3, ...) to torch dtypes:
# a table of the storage format, not knowledge of any quantization scheme.
FORMAT_TABLES = {CORE / "loading" / "checkpoint.py"}


def core_files():
    files = sorted(f for f in CORE.rglob("*.py") if f not in FORMAT_TABLES)
    assert len(files) >= 10
    return files


def test_core_names_no_quantized_dtype():
    found = []
    for f in core_files():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in SCHEME_DTYPES:
                found.append(f"{f.name}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in SCHEME_DTYPES:
                found.append(f"{f.name}:{node.lineno} {node.value!r}")
    assert found == []


def test_core_has_no_format_constants():
    found = []
    for f in core_files():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value in FORMAT_CONSTANTS:
                found.append(f"{f.name}:{node.lineno} {node.value}")
    assert found == []


def test_the_checker_would_catch_a_violation():
    bad = "import torch\nx = torch.float8_e4m3fn\nmax_ = 448.0\n"
    tree = ast.parse(bad)
    attrs = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
    consts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    assert "float8_e4m3fn" in attrs and 448.0 in consts


# ---- contract v2: an acyclic core that names no kernel technology; schemes are peers ------------

REPO = CORE.parent
BACKEND_NAMES = {"triton", "compiled", "cpu-int8", "scaled-mm", "OQ_COMPILE", "OQ_DISABLE_TRITON"}
"""Quantizer implementations and forward backends the built-in plugins name (``"cpu"`` is also a
device name, so the import check below covers the CPU kernels)."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of ``root``'s package it imports, at module level or inside functions
    (every ``import`` statement in the file: a function-level import is still a dependency)."""
    mods = {_module_name(p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                # `from pkg import sub` depends on the submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            graph[mod].update(t for t in targets if t in mods and t != mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_core_import_graph_is_acyclic():
    graph = import_graph(CORE)
    assert len(graph) >= 30
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_core_names_no_backend_and_imports_no_kernel_toolkit():
    found = []
    for f in core_files():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in BACKEND_NAMES:
                found.append(f"{f.name}:{node.lineno} {node.value!r}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for n in names:
                    if n.split(".")[0] in ("triton", "oq_toolkit") or n.startswith("oq_plugin"):
                        found.append(f"{f.name}:{node.lineno} import {n}")
            if isinstance(node, ast.Name) and "NUMEL" in node.id:
                found.append(f"{f.name}:{node.lineno} {node.id}")
    assert found == []


def test_fp8_imports_nothing_from_mxfp8():
    fp8 = REPO / "plugins" / "fp8"
    found = []
    for f in fp8.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import) and any(a.name.startswith("oq_plugin_mxfp8") for a in node.names):
                found.append(f"{f.name}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("oq_plugin_mxfp8"):
                found.append(f"{f.name}:{node.lineno}")
    assert found == []
