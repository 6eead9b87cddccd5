"""``torch.compile`` of quantized layers: zero graph breaks, compiled == eager, for every scheme
shorthand and every forward backend the planner offers on the CPU.

The matrix is derived, not hard-coded: for each shorthand of the registry and each layer kind it
defines, :func:`oqcore.plan` on the CPU lists the candidate backends for the shorthand's activation
key with their verdicts; every viable one (``is_supported`` true on the CPU; Triton is off,
``OQ_DISABLE_TRITON=1``) is pinned in one branch. A new backend a plugin adds is covered here
without editing this file. Branches: a dense MLP (two quantized linears around a ReLU, K = 224:
partial 128-groups, whole 32/16-groups; N = 72) and the experts block of each MoE layout
(mixtral, qwen3_moe, olmoe, gpt_oss; H = 160, I = 96), called directly
(``experts(x, top_k_index, top_k_weights)``). One "zoo" module per shorthand holds every branch,
so one compile per shorthand.

Checks: ``torch._dynamo.explain(zoo)`` finds no graph break, and the graph calls
``oqcore::linear_forward`` / ``oqcore::moe_forward`` exactly once per layer whose backend is not
traceable; ``torch.compile(zoo)`` equals eager within the bound of ``tests/test_compile_forward.py``,
stated per quantized layer on the input that layer received: ``|compiled - eager| <= 2 * K *
eps32 * (|x_q| @ |W|^T + |b|)`` elementwise (``x_q`` the fake-quantized activations, ``W`` the
dequantized weight); for the experts block the linear bound with K = H + I on the output's scale.
The second linear of an MLP is held to the bound against the eager layer run on the compiled
first layer's output: ReLU is exact, so a W8A8 activation that lands one float32 rounding away
may legitimately round to the neighbouring 8-bit value, which a bound through both layers would
misreport. (In practice every branch is bit-identical.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import oqcore
from oqcore.layers import moe_layout
from oqcore.modules import QuantizedLinear, QuantizedMoE

EPS32 = torch.finfo(torch.float32).eps
ARCHS = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss")
K, HIDDEN, N = 224, 160, 72
T = 5  # tokens (> 4: the C kernels' tiled path)


class MLP(nn.Module):
    """``x [M, K] -> (h = relu(up(x)) [M, HIDDEN], down(h) [M, N])``: both outputs, so each
    quantized layer's result can be checked on its own input."""

    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(K, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, N)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.act(self.up(x))
        return h, self.down(h)


class Zoo(nn.Module):
    """Named MLP branches (input ``x``) and experts branches (input ``(x, ids, weights)``)."""

    def __init__(self, mlps: dict[str, nn.Module], moes: dict[str, nn.Module]):
        super().__init__()
        self.mlps, self.moes = nn.ModuleDict(mlps), nn.ModuleDict(moes)

    def forward(self, xs: dict) -> dict:
        out = {name: m(xs[name]) for name, m in self.mlps.items()}
        out.update({name: m(*xs[name]) for name, m in self.moes.items()})
        return out


def _viable(model: nn.Module, shorthand: str, kind: str) -> list[str]:
    """The backends the planner offers on the CPU for ``model``'s ``kind`` layers under
    ``shorthand`` (viable for every such layer), by name."""
    layers = [lp for lp in oqcore.plan(model, shorthand, device="cpu").quantized if lp.kind == kind]
    if not layers:
        return []
    sets = [{c.backend.name for c in lp.candidates if c.reason is None} for lp in layers]
    return sorted(set.intersection(*sets))


@pytest.fixture(scope="module")
def experts_by_arch(tiny_moe):
    """``{arch: the first layer's high-precision experts module (float32)}``."""
    from transformers import AutoModelForCausalLM

    out = {}
    for arch in ARCHS:
        model = AutoModelForCausalLM.from_pretrained(tiny_moe(arch), dtype=torch.float32)
        out[arch] = next(m for m in model.modules() if moe_layout(m) is not None)
    return out


def _zoo(shorthand: str, experts_by_arch: dict) -> tuple[Zoo, dict]:
    """The eager zoo of ``shorthand`` (every viable backend pinned) and its inputs."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    mlps, moes, xs = {}, {}, {}
    for backend in _viable(MLP(), shorthand, "linear"):
        name = f"mlp_{backend}"
        mlps[name] = oqcore.quantize_(MLP(), {"scheme": shorthand, "backend": {"linear": backend}})
        xs[name] = torch.randn(T, K, generator=gen) * 3
    for arch, experts in experts_by_arch.items():
        lay = moe_layout(experts)
        holder = nn.ModuleDict({"experts": experts})
        for backend in _viable(holder, shorthand, "moe"):
            name = f"{arch}_{backend}"
            q = oqcore.quantize_(nn.ModuleDict({"experts": copy.deepcopy(experts)}), {"scheme": shorthand, "backend": {"moe": backend}})
            moes[name] = q["experts"]
            ids = torch.randint(0, lay.num_experts, (T, 2), generator=gen)
            xs[name] = (torch.randn(T, lay.hidden_size, generator=gen), ids, torch.rand(T, 2, generator=gen))
    return Zoo(mlps, moes).eval(), xs


def _bound(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """``2 * K * eps32 * (|x_q| @ |W|^T + |b|)``: the float32 summation-order bound, twice."""
    m = layer.method
    xq = m.fake_quantize_activation(x.float(), layer, "weight").float()
    w = m.dequantize_layer_weight(layer, "weight", torch.float32)
    mag = xq.abs() @ w.abs().t()
    if layer.bias is not None:
        mag = mag + layer.bias.float().abs()
    return 2 * x.shape[-1] * EPS32 * mag


def _count_ops(explain, op) -> int:
    return sum(1 for g in explain.graphs for n in g.graph.nodes if n.op == "call_function" and n.target in (op, op.default))


SHORTHANDS = sorted(oqcore.get_plugin_manager().registry.shorthands)


@pytest.mark.parametrize("shorthand", SHORTHANDS)
def test_no_graph_break_and_compiled_equals_eager(experts_by_arch, monkeypatch, shorthand):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    zoo, xs = _zoo(shorthand, experts_by_arch)
    assert zoo.mlps or zoo.moes, f"{shorthand}: the planner offers no CPU backend"
    assert all(f"{a}_torch" in zoo.moes for a in ARCHS), sorted(zoo.moes)  # the reference is always offered
    layers = [m for m in zoo.modules() if isinstance(m, (QuantizedLinear, QuantizedMoE))]
    opaque_linear = sum(isinstance(m, QuantizedLinear) and not m.method.backend.traceable for m in layers)
    opaque_moe = sum(isinstance(m, QuantizedMoE) and not m.method.backend.traceable for m in layers)
    assert len(layers) == 2 * len(zoo.mlps) + len(zoo.moes)

    torch._dynamo.reset()
    with torch.no_grad():
        explain = torch._dynamo.explain(zoo)(xs)
    assert explain.graph_break_count == 0, (shorthand, explain.break_reasons)
    assert _count_ops(explain, torch.ops.oqcore.linear_forward) == opaque_linear
    assert _count_ops(explain, torch.ops.oqcore.moe_forward) == opaque_moe

    torch._dynamo.reset()
    with torch.no_grad():
        eager, compiled = zoo(xs), torch.compile(zoo)(xs)
        bad = []
        for name, mlp in zoo.mlps.items():
            (he, ye), (hc, yc) = eager[name], compiled[name]
            assert torch.isfinite(ye).all() and hc.shape == he.shape and yc.shape == ye.shape, name
            # layer 1 (ReLU is 1-Lipschitz: the bound holds after it), then layer 2 on the compiled h
            for what, got, want, bound in (
                ("up", hc, he, _bound(mlp.up, xs[name])),
                ("down", yc, mlp.down(hc), _bound(mlp.down, hc)),
            ):
                err = (got - want).abs()
                if not (err <= bound).all():
                    bad.append(f"{name}.{what}: max err {err.max().item():.3g}, bound {bound.max().item():.3g}")
        for name, experts in zoo.moes.items():
            e, c = eager[name], compiled[name]
            lay = experts.layout
            assert torch.isfinite(e).all() and c.shape == e.shape and c.dtype == e.dtype, name
            tol = 2 * (lay.hidden_size + lay.intermediate_size) * EPS32 * (e.abs().max() + 1)
            if (c - e).abs().max() > tol:
                bad.append(f"{name}: max err {(c - e).abs().max().item():.3g}, bound {tol.item():.3g}")
    torch._dynamo.reset()
    assert not bad, f"{shorthand}: compiled != eager: " + "; ".join(bad)
