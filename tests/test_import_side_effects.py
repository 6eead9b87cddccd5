"""No side effects at import or left behind (issue 10, item 6).

Importing ``oqcore``, ``oqcore.cli`` and the built-in plugins' ``plugin`` modules (what plugin
discovery imports) must change nothing process-wide and pull in no heavy module: checked in a fresh
interpreter, since this test process has long since imported everything. Public functions that
must touch process-wide state (a seeded RNG) put it back before they return.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

# The imports under test, in order; each one's effects are reported under its own name.
IMPORTS = ("oqcore", "oqcore.cli", "oq_plugin_fp8.plugin", "oq_plugin_mxfp8.plugin", "oq_plugin_int8.plugin")

# Modules an import of the above must not load: compilers, kernels, model libraries, peers and plot
# tools are imported by the code path that uses them, never at import.
HEAVY = (
    "triton",
    "torch._inductor",
    "torch._dynamo",
    "torch.utils.cpp_extension",
    "transformers",
    "torchao",
    "compressed_tensors",
    "matplotlib",
    "bench",
)

# Runs in the fresh interpreter. The declared dependencies the core imports at top level are
# imported first: what they do at their own import is theirs, not oqcore's. Prints one JSON list of
# problems.
PROBE = r"""
import ctypes, faulthandler, gc, hashlib, json, logging, os, random, signal, sys, threading, warnings
import importlib
import numpy, pluggy, pydantic, torch, tqdm, typer  # the baseline: the core's own dependencies

IMPORTS, HEAVY = json.loads(sys.argv[1]), json.loads(sys.argv[2])

dlopened = []  # every ctypes library opened during the imports (CDLL and its subclasses, PyDLL...)
_cdll_init = ctypes.CDLL.__init__
def _spy_cdll(self, name, *a, **k):
    dlopened.append(str(name))
    return _cdll_init(self, name, *a, **k)
ctypes.CDLL.__init__ = _spy_cdll
_load_library = torch.ops.load_library
def _spy_load_library(path):
    dlopened.append(f"torch.ops.load_library({path})")
    return _load_library(path)
torch.ops.load_library = _spy_load_library

def native_libs():
    # Shared objects mapped into the process that are not Python extension modules (those are
    # imports, seen in sys.modules): what a dlopen by path or by a C extension leaves behind.
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if ".so" in line}
    except OSError:
        return set()
    return {p for p in paths if ".cpython-" not in p and ".abi3." not in p}

def digest(obj):
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]

def name_of(f):
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"

def state():
    loggers = {"<root>": logging.root, **{n: lg for n, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}}
    s = {
        f"logger {n!r}": (lg.level, lg.disabled, lg.propagate, len(lg.handlers), len(lg.filters))
        for n, lg in loggers.items()
    }
    s.update({
        "logging.disable": logging.root.manager.disable,
        "warnings.filters": [repr(f) for f in warnings.filters],
        "warnings.showwarning": name_of(warnings.showwarning),
        "warnings.formatwarning": name_of(warnings.formatwarning),
        "torch default dtype": str(torch.get_default_dtype()),
        "torch default device": str(torch.get_default_device()) if hasattr(torch, "get_default_device") else None,
        "torch num threads": torch.get_num_threads(),
        "torch num interop threads": torch.get_num_interop_threads(),
        "torch grad enabled": torch.is_grad_enabled(),
        "torch anomaly mode": torch.is_anomaly_enabled(),
        "torch deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch float32 matmul precision": torch.get_float32_matmul_precision(),
        "torch mkldnn enabled": torch.backends.mkldnn.enabled,
        "torch RNG state": digest(torch.get_rng_state().tolist()),
        "random state": digest(random.getstate()),
        "numpy random state": digest(numpy.random.get_state()[1].tolist()),
        "sys.path": list(sys.path),
        "sys.meta_path": [name_of(type(f)) for f in sys.meta_path],
        "sys.path_hooks": [name_of(h) for h in sys.path_hooks],
        "sys.excepthook": name_of(sys.excepthook),
        "sys.displayhook": name_of(sys.displayhook),
        "sys.stdio": [id(sys.stdin), id(sys.stdout), id(sys.stderr)],
        "sys.recursionlimit": sys.getrecursionlimit(),
        "sys.switchinterval": sys.getswitchinterval(),
        "sys.dont_write_bytecode": sys.dont_write_bytecode,
        "os.environ": dict(os.environ),
        "cwd": os.getcwd(),
        "signal handlers": {s.name: name_of(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD)},
        "threads": sorted(t.name for t in threading.enumerate()),
        "gc": (gc.isenabled(), gc.get_threshold()),
        "faulthandler": faulthandler.is_enabled(),
        "native libraries": sorted(native_libs()),
    })
    return s

DEFAULT_LOGGER = (logging.NOTSET, False, True, 0, 0)  # a logger only created is as good as absent

def change(a, b):
    # what differs, briefly: changed keys of a dict, added/removed items of a list
    if isinstance(a, dict) and isinstance(b, dict):
        return repr({k: (a.get(k, "<unset>"), b.get(k, "<unset>")) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)})
    if isinstance(a, list) and isinstance(b, list) and sorted(map(repr, a)) != sorted(map(repr, b)):
        return f"added {[x for x in b if x not in a]!r}, removed {[x for x in a if x not in b]!r}"
    return f"{a!r} -> {b!r}"

problems = []
for module in IMPORTS:
    before, n_dlopened = state(), len(dlopened)
    importlib.import_module(module)
    after = state()
    for key in sorted(before.keys() | after.keys()):
        default = DEFAULT_LOGGER if key.startswith("logger ") else None
        if before.get(key, default) != after.get(key, default):
            problems.append(f"import {module} changed {key}: {change(before.get(key, default), after.get(key, default))}")
    for lib in dlopened[n_dlopened:]:
        problems.append(f"import {module} opened the native library {lib!r} (ctypes)")
    for heavy in HEAVY:
        if heavy in sys.modules:
            problems.append(f"import {module} imported {heavy}")
            del sys.modules[heavy]  # reported once, under the import that pulled it in
print(json.dumps(problems))
"""


def test_imports_change_nothing_global(tmp_path):
    """``import oqcore``, ``oqcore.cli`` and each built-in plugin's ``plugin`` module, in a fresh
    interpreter: no logger level/handler, warnings filter or printer, torch setting (default dtype
    and device, threads, grad mode, RNG...), sys.path/hook/stdio, environment variable, signal
    handler or thread changes; no ctypes/torch library is opened; no heavy module is imported."""
    # cwd: an empty folder, so the repository's own folders (bench/) are not importable by accident
    p = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(IMPORTS), json.dumps(HEAVY)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert p.returncode == 0, p.stderr
    problems = json.loads(p.stdout.strip().splitlines()[-1])
    assert problems == [], "\n".join(problems)


def test_make_tiny_moe_leaves_the_global_rng_as_it_was(tmp_path):
    """make_tiny_moe seeds transformers' init (same arguments, same bytes) without leaving the
    caller's torch RNG seeded."""
    from safetensors.torch import load_file

    from oqcore.synthetic import make_tiny_moe

    def small(out):
        return make_tiny_moe("mixtral", out, hidden_size=32, intermediate_size=32, num_layers=1, vocab_size=64, seed=5)

    torch.manual_seed(1234)
    torch.rand(3)  # a state no seed gives directly
    before = torch.get_rng_state().clone()
    small(tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), before)
    small(tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
