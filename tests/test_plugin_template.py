"""The example third-party plugin in examples/plugin-template works exactly as a built-in once its
distribution is on the path (entry point read from its own pyproject.toml)."""

import tomllib
from pathlib import Path

import torch
from torch import nn

import oqcore
from fakedist import install_fake_dist
from oqcore.metrics import sqnr
from oqcore.modules import QuantizedLinear

TEMPLATE = Path(__file__).parent.parent / "examples" / "plugin-template"


def test_template_plugin_end_to_end(tmp_path, monkeypatch):
    meta = tomllib.loads((TEMPLATE / "pyproject.toml").read_text())
    eps = meta["project"]["entry-points"]["oqcore"]
    assert eps == {"int4_template": "oq_plugin_template.plugin"}
    install_fake_dist(tmp_path, monkeypatch, meta["project"]["name"], eps, {})
    monkeypatch.syspath_prepend(str(TEMPLATE))

    assert {i.name: i.plugin for i in oqcore.list_quant_keys()}["int4_g32"] == "int4_template"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40))
    p = oqcore.plan(model, {"linear": "int4_g32"})
    assert p.summary() == "Quantized 2 layers of types: 0: 1 (from linear: int4_g32); 2: 1 (from linear: int4_g32)"

    lp = p["0"]
    method = lp.bound.make_method(lp.backend)
    q = QuantizedLinear.from_linear("0", model[0], method)
    q.weight = nn.Parameter(model[0].weight.detach().clone(), requires_grad=False)
    q.bias = nn.Parameter(model[0].bias.detach().clone(), requires_grad=False)
    method.process_weights_after_loading(q)
    assert q.weight.dtype == torch.int8 and q.weight_scale.shape == (96, 2)
    assert int(q.weight.abs().max()) == 7
    x = torch.randn(8, 64)
    # int4 with 1x32 groups on uniform-init weights: ~20 dB; the bound catches a broken scale layout
    assert sqnr(model[0](x), q(x)) > 17


def test_template_shape_limit(tmp_path, monkeypatch):
    meta = tomllib.loads((TEMPLATE / "pyproject.toml").read_text())
    install_fake_dist(tmp_path, monkeypatch, meta["project"]["name"], meta["project"]["entry-points"]["oqcore"], {})
    monkeypatch.syspath_prepend(str(TEMPLATE))
    import pytest

    with pytest.raises(oqcore.UnsupportedLayerError, match="layer '1': int4_g32 needs in_features divisible by 32, got 48"):
        oqcore.plan(nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 8)), {"linear": "int4_g32"})


def test_the_templates_own_tests_pass():
    """The testing recipe the template ships (tests/conftest.py: the plugin loaded through its entry
    point) runs as a plugin author would run it."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TEMPLATE / "tests")],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "4 passed" in out.stdout
