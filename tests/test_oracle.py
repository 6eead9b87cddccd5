"""The backend oracle: activation filtering, pinning, priority, and errors listing every candidate."""

import pytest
import torch
from torch import nn

import oqcore
from oqcore import Backend, ConfigError, NoBackendError, select_backend
from oqcore.oracle import resolve_activation_override
from toy_scheme import TOY_ACT, register_toy


@pytest.fixture(autouse=True)
def toy():
    register_toy()


def model(n_out=16):
    return nn.Sequential(nn.Linear(32, n_out))


def test_highest_priority_supported_backend_wins():
    p = oqcore.plan(model(16), {"linear": "toy_int4"})
    lp = p["0"]
    assert lp.backend.name == "toy-fast"
    assert [(c.backend.name, c.reason) for c in lp.candidates] == [
        ("toy-fast", None),
        ("torch", None),
        ("torch", "serves activation toy_act, the spec asks for none"),
    ]


def test_unsupported_backend_is_skipped_with_its_reason():
    lp = oqcore.plan(model(15), {"linear": "toy_int4"})["0"]
    assert lp.backend.name == "torch"
    assert ("toy-fast", "toy-fast needs an even N") in [(c.backend.name, c.reason) for c in lp.candidates]


def test_activation_override_filters_candidates():
    lp = oqcore.plan(model(16), {"linear": {"weight": "toy_int4", "activation": "toy_act"}})["0"]
    assert lp.backend.name == "torch" and lp.backend.activation_key == TOY_ACT
    assert lp.bound.activation_key == TOY_ACT


def test_pinned_backend_that_cannot_serve_lists_every_candidate():
    with pytest.raises(NoBackendError) as e:
        oqcore.plan(model(15), {"linear": "toy_int4", "backend": {"linear": "toy-fast"}})
    msg = str(e.value)
    assert msg.startswith(
        "layer '0': no backend can run this linear layer (weight key toy_int4, method ToyLinear from plugin 'toy') "
        "on cpu with activation none. Candidates:"
    )
    assert "  - toy-fast (toy) [activation none]: toy-fast needs an even N" in msg
    assert "  - torch (toy) [activation none]: not the pinned backend 'toy-fast'" in msg
    assert "  - torch (toy) [activation toy_act]: serves activation toy_act, the spec asks for none" in msg


def test_pinned_backend_that_exists_is_used():
    lp = oqcore.plan(model(16), {"linear": "toy_int4", "backend": {"linear": "torch"}})["0"]
    assert lp.backend.name == "torch"


def test_pinning_a_backend_nobody_offers_fails_at_validation():
    with pytest.raises(ConfigError) as e:
        oqcore.QuantizationConfig(linear="toy_int4", backend={"linear": "cutlass"})
    assert e.value.field == "backend.linear"
    assert str(e.value) == (
        "backend.linear: unknown backend 'cutlass' for linear layers with weight toy_int4; valid backends: torch, toy-fast"
    )
    with pytest.raises(ConfigError, match=r"^backend.linear: unknown backend 'toy-fsat' .*did you mean 'toy-fast'\?"):
        oqcore.plan(model(16), {"linear": "toy_int4", "backend": {"linear": "toy-fsat"}})


def test_select_backend_pin_outside_the_candidates_names_the_kind_field():
    with pytest.raises(ConfigError, match=r"^backend.linear: backend 'cutlass' is not a candidate for layer 'l'; candidates: torch"):
        select_backend("l", nn.Linear(4, 4), [Backend("torch", None)], None, "cpu", pinned="cutlass", kind="linear")


def test_no_backend_error_without_layer_details_keeps_the_short_form():
    with pytest.raises(NoBackendError, match=r"^layer 'l': no backend can run it on cpu with activation none"):
        select_backend("l", nn.Linear(4, 4), [Backend("x", None, lambda l, d: (False, "never"))], None, "cpu")


def test_order_is_priority_then_name_never_registration_order():
    layer = nn.Linear(4, 4)
    a = Backend("b-second", None, priority=5)
    b = Backend("a-first", None, priority=5)
    c = Backend("z-top", None, priority=9)
    for cands in ([a, b, c], [c, b, a], [b, a, c]):
        choice = select_backend("l", layer, cands, None, "cpu")
        assert choice.backend.name == "z-top"
        assert [x.backend.name for x in choice.candidates] == ["z-top", "a-first", "b-second"]


def test_a_raising_is_supported_rejects_only_its_backend():
    def boom(layer, device):
        raise RuntimeError("driver exploded")

    choice = select_backend("l", nn.Linear(4, 4), [Backend("x", None, boom, 9), Backend("torch", None)], None, "cpu")
    assert choice.backend.name == "torch"
    assert choice.candidates[1].reason == "is_supported raised RuntimeError: driver exploded"


def test_no_candidates_at_all():
    with pytest.raises(NoBackendError, match=r"Candidates:\n  \(none offered\)"):
        select_backend("l", nn.Linear(4, 4), [], None, torch.device("cpu"))


def test_activation_override_vs_checkpoint_declared():
    k1 = oqcore.quant_key("fp8_per_token", "activation")
    k2 = oqcore.quant_key("mxfp8", "activation")
    assert resolve_activation_override(None, k1) == k1
    assert resolve_activation_override(k1, None) == k1
    assert resolve_activation_override(k1, k1) == k1
    assert resolve_activation_override(None, None) is None
    with pytest.raises(ConfigError) as e:
        resolve_activation_override(k2, k1, field="moe.activation")
    assert e.value.field == "moe.activation"
    assert "conflicts with the checkpoint's declared activation" in str(e.value)
    assert "remove the override or set it to the checkpoint's key" in str(e.value)


def test_oq_disable_triton_turns_triton_backends_off(monkeypatch):
    from oq_toolkit.triton_support import triton_support

    assert triton_support("cpu") == (True, "CPU under TRITON_INTERPRET=1 (testing only)")
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    assert triton_support("cpu") == (False, "disabled by OQ_DISABLE_TRITON=1")
    assert triton_support("cuda") == (False, "disabled by OQ_DISABLE_TRITON=1")
