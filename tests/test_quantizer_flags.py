"""The quantizer flags of ``oq_register_quantizers``: ``checks_finite`` (the core skips its own
NaN/Inf pass and turns the quantizer's NonFiniteError into an UnsupportedLayerError naming the layer)
and ``whole_stack`` (an expert stack goes to the quantizer in one call instead of one per expert)."""

from __future__ import annotations

import pytest
import torch

import oqcore
from oqcore import NonFiniteError, UnsupportedLayerError, hookimpl
from oqcore.tensor import require_finite
import toy_scheme
from toy_scheme import TOY, ToyMoE, dequantize, quantize

CALLS: list[tuple[int, ...]] = []


def checked_quantize(w, options):
    """The toy quantizer, raising NonFiniteError itself (as a fused kernel finding it in its amax)."""
    CALLS.append(tuple(w.shape))
    if not torch.isfinite(w).all():
        raise NonFiniteError("toy: NaN/Inf")
    return quantize(w, options)


class FlaggedToy:
    """Adds a ``cpu`` quantizer for the toy key with both flags set."""

    @hookimpl
    def oq_register_quantizers(self, register):
        register(TOY, "cpu", checked_quantize, dequantize, checks_finite=True, whole_stack=True)


@pytest.fixture
def flagged(monkeypatch):
    CALLS.clear()
    pm = toy_scheme.register_toy()
    pm.register(FlaggedToy(), "toy-flagged")
    passes = []
    real = oqcore.formats.check_finite
    monkeypatch.setattr(oqcore.formats, "check_finite", lambda w, name: (passes.append(name), real(w, name))[1])
    return passes


def test_flags_are_recorded():
    toy_scheme.register_toy()
    oqcore.get_plugin_manager().register(FlaggedToy(), "toy-flagged")
    reg = oqcore.get_registry()
    fast, ref = reg.quantizers[(TOY, "cpu")], reg.quantizers[(TOY, "torch")]
    assert (fast.checks_finite, fast.whole_stack, fast.plugin) == (True, True, "toy-flagged")
    assert (ref.checks_finite, ref.whole_stack) == (False, False)


def test_checking_quantizer_skips_the_core_pass_and_errors_name_the_layer(flagged):
    w = torch.randn(6, 8)
    qt = oqcore.quantize_tensor(w, TOY, quantizer="cpu", name="m.q_proj")
    ref = oqcore.quantize_tensor(w, TOY, quantizer="torch", name="m.q_proj")
    assert torch.equal(qt.qdata, ref.qdata)
    assert flagged == ["m.q_proj"]  # only the reference backend ran the separate pass
    w[2, 3] = float("nan")
    w[4, 0] = float("-inf")
    with pytest.raises(UnsupportedLayerError) as e:
        oqcore.quantize_tensor(w, TOY, quantizer="cpu", name="m.q_proj")
    assert str(e.value) == "layer 'm.q_proj': weight holds 2 NaN/Inf value(s) of 48; refusing to quantize"
    assert e.value.layer == "m.q_proj"


def test_stack_errors_name_the_expert():
    w = torch.randn(5, 4, 8)
    w[1, 0, 0] = float("inf")
    w[3, 2, 1:3] = float("nan")
    with pytest.raises(UnsupportedLayerError) as e:
        oqcore.tensor.check_finite(w, "m.experts.gate_up_proj")
    assert str(e.value) == (
        "layer 'm.experts.gate_up_proj[expert 1]': weight holds 1 NaN/Inf value(s) of 32 (experts 3 too); refusing to quantize"
    )


def test_require_finite():
    require_finite(torch.randn(3, 4).bfloat16())
    require_finite(torch.empty(0, 4))
    with pytest.raises(NonFiniteError, match=r"tensor of shape \[2, 2\] holds NaN/Inf"):
        require_finite(torch.tensor([[1.0, float("nan")], [0.0, 2.0]]))


def _moe_method(backend_name="torch"):
    from oqcore.oracle import Backend

    formats = oqcore.get_registry().method_formats(TOY, None)
    return ToyMoE(activation_key=None, options=None, backend=Backend(backend_name, None), formats=formats)


def test_whole_stack_quantizer_gets_the_stack_in_one_call(flagged):
    w = torch.randn(4, 6, 8)
    q, s = _moe_method().quantize_weight(w, "m.experts.gate_up_proj")
    assert CALLS == [(4, 6, 8)]
    ref_q, ref_s = quantize(w, None)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    # a transposed (GPT-OSS) view is not contiguous: one contiguous expert at a time
    CALLS.clear()
    wt = torch.randn(4, 8, 6).transpose(1, 2)
    q, _ = _moe_method().quantize_weight(wt, "m.experts.gate_up_proj")
    assert CALLS == [(6, 8)] * 4
    assert torch.equal(q, quantize(wt.contiguous(), None)[0])


def test_whole_stack_error_names_the_expert(flagged):
    w = torch.randn(4, 6, 8)
    w[2, 1, 1] = float("nan")
    with pytest.raises(UnsupportedLayerError, match=r"^layer 'm.experts.down_proj\[expert 2\]': weight holds 1 NaN/Inf value\(s\) of 48;"):
        _moe_method().quantize_weight(w, "m.experts.down_proj")


def test_reference_quantizer_is_called_per_expert(monkeypatch):
    calls = []
    monkeypatch.setattr(toy_scheme, "quantize", lambda w, o: (calls.append(tuple(w.shape)), quantize(w, o))[1])
    toy_scheme.register_toy()  # registers the spy as the toy's torch reference
    _moe_method().quantize_weight(torch.randn(3, 6, 8), "m.experts.down_proj")
    assert calls == [(6, 8)] * 3


def test_flagged_quantizer_errors_follow_the_contract(flagged, monkeypatch):
    """A ``ValueError`` of a flagged quantizer names the layer and the plugin; a bug is a PluginError."""
    from oqcore import PluginError

    reg = oqcore.get_registry()
    fast = reg.quantizers[(TOY, "cpu")]
    import dataclasses

    def refuse(w, options):
        raise ValueError("toy cpu kernel needs K <= 4")

    reg.quantizers[(TOY, "cpu")] = dataclasses.replace(fast, quantize=refuse)
    with pytest.raises(UnsupportedLayerError, match=r"^layer 'm.q_proj': .*plugin 'toy-flagged'.*K <= 4"):
        oqcore.quantize_tensor(torch.randn(6, 8), TOY, backend="cpu", name="m.q_proj")

    def crash(w, options):
        raise RuntimeError("segfault avoided")

    reg.quantizers[(TOY, "cpu")] = dataclasses.replace(fast, quantize=crash)
    with pytest.raises(PluginError, match=r"^plugin 'toy-flagged': .*'m.q_proj'.*RuntimeError: segfault avoided") as e:
        oqcore.quantize_tensor(torch.randn(6, 8), TOY, backend="cpu", name="m.q_proj")
    assert isinstance(e.value.__cause__, RuntimeError)
