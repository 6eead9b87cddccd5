"""Test-wide setup.

``TRITON_INTERPRET=1`` must be in the environment before any ``@triton.jit`` decorator runs, so it
is set here, before any test module imports a kernel: Triton kernels then run on the CPU through
Triton's interpreter, and the ``triton`` backends report themselves supported on the CPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import oqcore.plugins  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Every test starts from the installed entry points only (no plugin a previous test registered)."""
    for var in ("OQ_PLUGINS", "OQ_DISABLE_PLUGINS", "OQ_STRICT_PLUGINS", "OQ_DISABLE_TRITON", "OQ_QUANTIZER"):
        monkeypatch.delenv(var, raising=False)
    oqcore.plugins.reset_plugin_manager()
    yield
    oqcore.plugins.reset_plugin_manager()


@pytest.fixture
def seeded():
    """A seeded torch generator state, so random tensors are the same on every run."""
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory):
    """``tiny_moe(arch, seed=0)`` -> folder of a tiny random MoE causal LM saved by transformers
    (built once per session and argument set)."""
    from oqcore.synthetic import make_tiny_moe

    made = {}

    def get(arch, seed=0, **kw):
        key = (arch, seed, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = make_tiny_moe(arch, tmp_path_factory.mktemp(f"{arch}-{seed}"), seed=seed, **kw)
        return made[key]

    return get


@pytest.fixture(scope="session")
def minilm():
    """The bundled real all-MiniLM-L6-v2 folder."""
    from oqcore.loading import bundled_model_dir

    return bundled_model_dir()


@pytest.fixture(scope="session")
def big_checkpoint(tmp_path_factory):
    """A ~300 MB bf16 Mixtral checkpoint (12 layers, hidden 512, intermediate 1024, 8 experts),
    built once per session by ``oq make-model`` in a subprocess: for the peak-memory tests."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("big")
    cmd = [sys.executable, "-m", "oqcore.cli", "make-model", "mixtral", str(out), "--hidden-size", "512",
           "--intermediate-size", "1024", "--layers", "12", "--experts", "8"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out
