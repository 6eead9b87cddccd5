"""oqcore.torch_compat: each wrapper of a private torch/transformers API, on its private path and
on its fallback (the path taken when torch or transformers drops the private API), and the rule
that nothing else under ``oqcore/`` uses those private names (issue 10, item 6).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import oqcore.torch_compat as tc

ROOT = Path(__file__).resolve().parents[1] / "oqcore"


@pytest.fixture(params=["private", "fallback"])
def path(request, monkeypatch):
    """Run a test on the private fast path and on the public-API fallback (as if nn.Module no
    longer kept its ``_parameters`` / ``_buffers`` / ``_modules`` dicts)."""
    if request.param == "fallback":
        monkeypatch.setattr(tc, "_dict_of", lambda module, kind: None)
    return request.param


def _linear(bias=True) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=bias)
    lin.register_buffer("kept", torch.ones(2))
    lin.register_buffer("scratch", torch.zeros(2), persistent=False)
    return lin


def test_parameter_helpers(path):
    lin = _linear()
    w = lin.weight
    assert tc.has_parameter(lin, "weight") and tc.get_parameter(lin, "weight") is w
    assert list(tc.own_parameters(lin)) == ["weight", "bias"]
    stored = tc.set_parameter(lin, "weight", torch.full((3, 4), 2.0))
    assert isinstance(stored, nn.Parameter) and not stored.requires_grad
    assert lin.weight is stored and torch.equal(lin.weight, torch.full((3, 4), 2.0))
    assert list(tc.own_parameters(lin)) == ["weight", "bias"]  # replaced in place, order kept
    p = nn.Parameter(torch.ones(3))
    assert tc.set_parameter(lin, "bias", p) is p and lin.bias is p  # a Parameter is stored as is
    tc.delete_parameter(lin, "bias")
    assert not tc.has_parameter(lin, "bias") and list(tc.own_parameters(lin)) == ["weight"]
    tc.delete_parameter(lin, "bias")  # absent: nothing happens
    tc.set_parameter(lin, "extra", torch.zeros(1))
    assert list(tc.own_parameters(lin)) == ["weight", "extra"]
    tc.clear_parameters(lin)
    assert tc.own_parameters(lin) == {} and list(lin.parameters()) == []


def test_a_none_slot_stays_a_none_slot():
    lin = _linear(bias=False)
    assert tc.has_parameter(lin, "bias") and tc.get_parameter(lin, "bias") is None
    assert list(tc.own_parameters(lin)) == ["weight"]
    tc.set_parameter(lin, "weight", torch.zeros(3, 4))
    tc.clear_parameters(lin)
    assert not tc.has_parameter(lin, "bias")  # cleared: the None slot too


def test_buffer_helpers_keep_persistence(path):
    lin = _linear()
    assert list(tc.own_buffers(lin)) == ["kept", "scratch"]
    assert tc.is_persistent_buffer(lin, "kept") and not tc.is_persistent_buffer(lin, "scratch")
    new = torch.full((2,), 7.0)
    assert tc.set_buffer(lin, "scratch", new) is new and tc.get_buffer(lin, "scratch") is new
    assert not tc.is_persistent_buffer(lin, "scratch") and "scratch" not in lin.state_dict()
    tc.set_buffer(lin, "kept", torch.full((2,), 3.0))
    assert torch.equal(lin.state_dict()["kept"], torch.full((2,), 3.0))


def test_bare_copy_shares_attributes_not_tensors(path):
    seq = nn.Sequential(nn.Linear(2, 2))
    seq.note = "kept"
    seq.register_parameter("own", nn.Parameter(torch.ones(1)))
    seq.register_buffer("buf", torch.ones(1))
    snap = {n: t.clone() for n, t in seq.state_dict().items()}
    new = tc.bare_copy(seq)
    assert type(new) is nn.Sequential and new.note == "kept" and new[0] is seq[0]
    assert tc.own_parameters(new) == {} and tc.own_buffers(new) == {}
    tc.set_parameter(new, "mine", torch.zeros(1))
    # the original is untouched: same parameters, buffers and values
    assert list(tc.own_parameters(seq)) == ["own"] and list(tc.own_buffers(seq)) == ["buf"]
    assert seq.state_dict().keys() == snap.keys() and all(torch.equal(seq.state_dict()[k], v) for k, v in snap.items())


def test_storage_use_count_and_its_fallback(monkeypatch):
    t = torch.empty(8)
    alone = tc.storage_use_count(t)
    if alone is None:
        pytest.skip("this torch does not expose storage use counts")
    view = t[2:4]
    assert tc.storage_use_count(t) > alone
    del view
    assert tc.storage_use_count(t) == alone
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    assert tc.storage_use_count(t) is None  # the staging pool then reuses nothing


class _Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.act_fn = nn.SiLU()


class _ClampedExperts(_Experts):
    limit = 1.0

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        return gate.clamp(max=self.limit) * up


def test_experts_gate_uses_the_classes_own_gate_else_the_standard_one():
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    holder = _ClampedExperts()
    own = tc.experts_gate(holder)
    assert torch.equal(own(holder, x), x[..., ::2].clamp(max=1.0) * x[..., 1::2])
    plain = _Experts()
    fallback = tc.experts_gate(plain)
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(fallback(plain, x), nn.functional.silu(gate) * up)


def test_mark_initialized():
    p = nn.Parameter(torch.ones(1))
    tc.mark_initialized(p)
    assert p._is_hf_initialized is True


# ---- nothing else under oqcore/ uses these private names -------------------------------------------

PRIVATE = {
    "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",  # nn.Module internals
    "_storage_Use_Count",  # torch._C
    "_apply_gate", "_is_hf_initialized",  # transformers
}  # fmt: skip

def _private_uses(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` of every private name of :data:`PRIVATE` used in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE:
            out.append((node.lineno, node.attr))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in PRIVATE:
            out.append((node.lineno, node.value))  # getattr(x, "_apply_gate")
    return out


def test_private_apis_are_used_only_in_torch_compat():
    files = [p for p in sorted(ROOT.rglob("*.py")) if p.name != "torch_compat.py"]
    uses = [f"oqcore/{p.relative_to(ROOT)}:{line}: {name}" for p in files for line, name in _private_uses(p.read_text())]
    assert uses == [], "use oqcore.torch_compat instead:\n" + "\n".join(uses)


def test_the_rule_sees_a_private_use():
    src = "def f(m):\n    m._parameters['w'] = None\n    return getattr(type(m), '_apply_gate', None)\n"
    assert _private_uses(src) == [(2, "_parameters"), (3, "_apply_gate")]


def test_torch_compat_is_a_leaf():
    """It imports torch only (stdlib aside): any oqcore module may use it without a cycle."""
    tree = ast.parse((ROOT / "torch_compat.py").read_text())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m == "oqcore" or m.startswith("oqcore.") for m in mods), mods
