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
