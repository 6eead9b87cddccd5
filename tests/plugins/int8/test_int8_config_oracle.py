"""Config names, shorthand slots, methods registered and the backend oracle for int8."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import oqcore
from oq_plugin_int8.keys import kInt8DynamicTokenSym, kInt8StaticChannelSym


def test_shorthand_is_moe_only_and_weight_only():
    c = oqcore.QuantizationConfig(moe="int8_per_channel_weight_only")
    assert c.moe.weight == kInt8StaticChannelSym
    assert c.moe.activation is None and c.moe.activation_given
    assert c.linear is None


def test_shorthand_for_linear_is_a_config_error():
    with pytest.raises(oqcore.ConfigError) as ei:
        oqcore.QuantizationConfig(linear="int8_per_channel_weight_only")
    assert ei.value.field == "linear.weight"


def test_linear_with_explicit_weight_key():
    c = oqcore.QuantizationConfig(linear={"weight": "int8_per_channel_static"})
    assert c.linear.weight == kInt8StaticChannelSym
    w8a8 = oqcore.QuantizationConfig(linear={"weight": "int8_per_channel_static", "activation": "int8_per_token"})
    assert w8a8.linear.activation == kInt8DynamicTokenSym


def test_methods_registered():
    reg = oqcore.get_registry()
    linear, moe = reg.method("linear", kInt8StaticChannelSym).cls, reg.method("moe", kInt8StaticChannelSym).cls
    # derived by the core from the int8 Scheme record
    assert (linear.__name__, moe.__name__) == ("Int8LinearMethod", "Int8MoEMethod")
    assert issubclass(linear, oqcore.OnlineLinearMethodBase) and issubclass(moe, oqcore.OnlineMoEMethodBase)
    for cls in (linear, moe):
        assert cls.supported_activation_keys == (None, kInt8DynamicTokenSym)
        assert cls.default_activation_key is None


def test_activation_not_supported_is_config_error():
    with pytest.raises(oqcore.ConfigError) as ei:
        oqcore.QuantizationConfig(linear={"weight": "int8_per_channel_static", "activation": "fp8_per_token"})
    assert ei.value.field is not None and "activation" in ei.value.field


def _model():
    return nn.Sequential(nn.Linear(64, 32))


def test_oracle_default_picks_highest_priority():
    # Under TRITON_INTERPRET=1 (conftest) triton (100) is supported on the CPU and beats cpu-int8 (50).
    lp = oqcore.plan(_model(), {"linear": {"weight": "int8_per_channel_static"}})["0"]
    assert lp.backend.name == "triton" and lp.backend.activation_key is None
    viable = [c.backend.name for c in lp.candidates if c.reason is None]
    assert viable == ["triton", "cpu-int8", "torch"]
    assert lp.bound.activation_key is None


def test_oracle_pinned_cpu_int8():
    lp = oqcore.plan(_model(), {"linear": {"weight": "int8_per_channel_static"}, "backend": {"linear": "cpu-int8"}})["0"]
    assert lp.backend.name == "cpu-int8"
    assert lp.backend.priority == 50 and lp.backend.prepare is not None


def test_oracle_w8a8_picks_triton_and_filters_by_activation():
    lp = oqcore.plan(_model(), {"linear": {"weight": "int8_per_channel_static", "activation": "int8_per_token"}})["0"]
    assert lp.backend.name == "triton" and lp.backend.activation_key == kInt8DynamicTokenSym
    viable = {(c.backend.name, c.backend.activation_key) for c in lp.candidates if c.reason is None}
    assert viable == {("triton", kInt8DynamicTokenSym), ("cpu-int8", kInt8DynamicTokenSym), ("torch", kInt8DynamicTokenSym)}


def test_oracle_pinned_cpu_int8_serves_w8a8_with_int_mm():
    """``cpu-int8`` has a W8A8 candidate (per-token activations, ``torch._int_mm``); its weight-only
    twin is rejected for the activation, and the plan says so."""
    cfg = {"linear": {"weight": "int8_per_channel_static", "activation": "int8_per_token"}, "backend": {"linear": "cpu-int8"}}
    lp = oqcore.plan(_model(), cfg)["0"]
    assert lp.backend.name == "cpu-int8" and lp.backend.activation_key == kInt8DynamicTokenSym
    assert "torch._int_mm" in lp.backend.description
    reasons = {(c.backend.name, c.backend.activation_key): c.reason for c in lp.candidates}
    assert "serves activation none, the spec asks for int8_per_token" in reasons[("cpu-int8", None)]
    assert reasons[("triton", kInt8DynamicTokenSym)] == "not the pinned backend 'cpu-int8'"


def test_int_mm_refuses_k_that_overflows_int32():
    from oq_plugin_int8.backends import INT_MM_MAX_K, _int_mm_supported

    assert INT_MM_MAX_K == 133144  # (2^31 - 1) // 127^2: the largest K whose int32 sums cannot overflow
    ok, why = _int_mm_supported(torch.nn.Linear(INT_MM_MAX_K + 1, 1, device="meta"), torch.device("cpu"))
    assert not ok and f"K={INT_MM_MAX_K + 1}" in why
    assert _int_mm_supported(torch.nn.Linear(INT_MM_MAX_K, 1, device="meta"), torch.device("cpu"))[0]


def test_triton_rejected_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lp = oqcore.plan(_model(), {"linear": {"weight": "int8_per_channel_static"}})["0"]
    assert lp.backend.name == "cpu-int8"
    reasons = {c.backend.name: c.reason for c in lp.candidates if c.backend.activation_key is None}
    assert "TRITON_INTERPRET" in reasons["triton"]


def candidates(kind):
    """Every forward backend the plugins offer for int8 per-channel weights (the scheme's and the
    core's ``torch`` reference)."""
    return oqcore.get_plugin_manager().backend_candidates(kind, kInt8StaticChannelSym)


def test_cpu_int8_says_why_not_on_other_devices():
    cpu_int8 = [b for b in candidates("linear") if b.name == "cpu-int8"][0]
    ok, why = cpu_int8.is_supported(nn.Linear(64, 4), torch.device("cuda"))
    assert not ok and "CPU" in why and "cuda" in why
    ok, why = cpu_int8.is_supported(nn.Linear(64, 4), torch.device("cpu"))
    assert ok and "_weight_int8pack_mm" in why


def test_moe_plan_weight_only():
    names = sorted((b.name, b.priority) for b in candidates("moe") if b.activation_key is None)
    assert names == [("cpu-int8", 50), ("torch", 0), ("triton", 100)]
    with pytest.raises(oqcore.ConfigError, match="unknown layer kind 'attention'"):
        candidates("attention")


def test_plugin_module_import_is_cheap():
    code = (
        "import sys, oq_plugin_int8.plugin, oqcore; oqcore.get_registry(); "
        "oqcore.get_plugin_manager().backend_candidates('linear', oqcore.quant_key('int8_per_channel_static')); "
        "print('triton' in sys.modules)"
    )
    # only this plugin: another scheme importing triton must not mask a regression here
    env = {**os.environ, "OQ_PLUGINS": "int8", "OQ_STRICT_PLUGINS": "1"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("k", [37, 40])
def test_cpu_int8_rejects_k_not_multiple_of_16(k):
    # torch._weight_int8pack_mm returns NaN or segfaults for such K: never pick it
    model = nn.Sequential(nn.Linear(k, 32))
    lp = oqcore.plan(model, {"linear": {"weight": "int8_per_channel_static"}}, device="cpu")["0"]
    reasons = {c.backend.name: c.reason for c in lp.candidates if c.backend.activation_key is None}
    assert f"K={k}" in reasons["cpu-int8"] and "divisible by 16" in reasons["cpu-int8"]
    with pytest.raises(oqcore.NoBackendError, match=f"K={k}"):
        oqcore.plan(model, {"linear": {"weight": "int8_per_channel_static"}, "backend": {"linear": "cpu-int8"}})


def test_cpu_int8_moe_checks_both_reduction_dims():
    class Experts(nn.Module):
        def __init__(self, h, i):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(2, 2 * i, h))
            self.down_proj = nn.Parameter(torch.zeros(2, h, i))

    cpu_int8 = [b for b in candidates("moe") if b.name == "cpu-int8"][0]
    assert cpu_int8.is_supported(Experts(64, 96), torch.device("cpu"))[0]
    ok, why = cpu_int8.is_supported(Experts(64, 36), torch.device("cpu"))
    assert not ok and "intermediate size I=36" in why
