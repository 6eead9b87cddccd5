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
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import oqcore
from oqcore.layers import moe_layout
from oqcore.modules import QuantizedLinear, QuantizedMoE
from tests.battery.util import raises_naming

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
        bad = [msg for name, mlp in zoo.mlps.items() for msg in _mlp_mismatch(name, mlp, xs[name], eager[name], compiled[name])]
        bad += [msg for name, ex in zoo.moes.items() for msg in _moe_mismatch(name, ex, eager[name], compiled[name])]
    torch._dynamo.reset()
    assert not bad, f"{shorthand}: compiled != eager: " + "; ".join(bad)


def _mlp_mismatch(name: str, mlp: MLP, x: torch.Tensor, eager: tuple, compiled: tuple) -> list[str]:
    """The MLP's quantized layers outside the module docstring's bound, described (empty: none).
    Layer 1 on ``x`` (ReLU is 1-Lipschitz: the bound holds after it), layer 2 against the eager
    layer run on the compiled layer 1's output."""
    (he, ye), (hc, yc) = eager, compiled
    assert torch.isfinite(ye).all() and hc.shape == he.shape and yc.shape == ye.shape, name
    bad = []
    for what, got, want, bound in (
        ("up", hc, he, _bound(mlp.up, x)),
        ("down", yc, mlp.down(hc), _bound(mlp.down, hc)),
    ):
        err = (got - want).abs()
        if not (err <= bound).all():
            bad.append(f"{name}.{what}: max err {err.max().item():.3g}, bound {bound.max().item():.3g}")
    return bad


def _moe_mismatch(name: str, experts: QuantizedMoE, e: torch.Tensor, c: torch.Tensor) -> list[str]:
    """The experts' output outside the linear bound with K = H + I on the output's scale."""
    lay = experts.layout
    assert torch.isfinite(e).all() and c.shape == e.shape and c.dtype == e.dtype, name
    tol = 2 * (lay.hidden_size + lay.intermediate_size) * EPS32 * (e.abs().max() + 1)
    err = (c - e).abs().max()
    return [] if err <= tol else [f"{name}: max err {err.item():.3g}, bound {tol.item():.3g}"]


# ---- every weight key x every dynamic activation key ------------------------------------------


def _pairs() -> list[tuple[str, str, str | None]]:
    """``(kind, weight key, activation key or None)`` for every weight key of the registry and
    every activation key its method for ``kind`` supports, static ones left out (an online
    quantization has no calibrated input scale: a ConfigError, tested elsewhere)."""
    from oqcore.config import bind_spec

    reg = oqcore.get_plugin_manager().registry
    out = []
    for kind in ("linear", "moe"):
        for w in reg.keys.names("weight"):
            for act in bind_spec({"weight": w}, kind, reg).method_cls.supported_activation_keys:
                if act is None or not act.scale.static:
                    out.append((kind, w, None if act is None else reg.name_of(act, "activation")))
    return out


def test_every_activation_key_runs_as_one_op(experts_by_arch, monkeypatch):
    """Beyond the shorthands' default activations: every (weight key, dynamic activation key or
    weight-only) pair, every backend the planner offers on the CPU for it, a dense MLP and the
    Mixtral experts (every layout runs the same op; the layouts are covered above), each in
    float32 and bfloat16 (the fake implementation promises ``x.dtype`` out: a backend returning
    another dtype would be caught here; the C kernels take other paths for bf16): zero graph
    breaks (``fullgraph=True`` refuses any, and Dynamo traces this large zoo once instead of twice
    with ``explain``), one op per opaque layer, compiled (inductor) bit-identical to eager (the op
    runs the eager forward; ReLU and the routing clamp are exact). The linear ``torch`` reference
    is traceable (inductor fuses it): its compiled numerics for every activation key are
    ``tests/test_compile_forward.py``'s zoo, so it is left out here; any other traceable backend is
    held to the bound of the module docstring."""
    from oqcore.formats import REFERENCE

    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    mlps, moes, xs = {}, {}, {}
    for kind, w, act in _pairs():
        spec = {"weight": w, "activation": act}
        tag = f"{w}_{act or 'wo'}"
        for dt in (torch.float32, torch.bfloat16):
            dtag = f"{tag}_{str(dt)[6:]}"
            if kind == "linear":
                for backend in _viable(MLP().to(dt), {"linear": spec}, "linear"):
                    if backend != REFERENCE:
                        mlps[f"mlp_{dtag}_{backend}"] = oqcore.quantize_(MLP().to(dt), {"linear": spec, "backend": {"linear": backend}})
                        xs[f"mlp_{dtag}_{backend}"] = (torch.randn(T, K, generator=gen) * 3).to(dt)
                continue
            experts = copy.deepcopy(experts_by_arch["mixtral"]).to(dt)
            lay = moe_layout(experts)
            for backend in _viable(nn.ModuleDict({"experts": experts}), {"moe": spec}, "moe"):
                name = f"mixtral_{dtag}_{backend}"
                holder = nn.ModuleDict({"experts": copy.deepcopy(experts)})
                moes[name] = oqcore.quantize_(holder, {"moe": spec, "backend": {"moe": backend}})["experts"]
                ids = torch.randint(0, lay.num_experts, (T, 2), generator=gen)
                xs[name] = (torch.randn(T, lay.hidden_size, generator=gen).to(dt), ids, torch.rand(T, 2, generator=gen).to(dt))
    zoo = Zoo(mlps, moes).eval()
    assert len(moes) >= 2 * len([p for p in _pairs() if p[0] == "moe"]), sorted(moes)  # the reference at least
    layers = [m for m in zoo.modules() if isinstance(m, (QuantizedLinear, QuantizedMoE))]
    opaque = {kind: sum(isinstance(m, cls) and not m.method.backend.traceable for m in layers) for kind, cls in (("linear", QuantizedLinear), ("moe", QuantizedMoE))}

    graphs = []

    def inductor_recording(gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        eager, compiled = zoo(xs), torch.compile(zoo, backend=inductor_recording, fullgraph=True)(xs)
        assert len(graphs) == 1
        explain = SimpleNamespace(graphs=graphs)
        assert _count_ops(explain, torch.ops.oqcore.linear_forward) == opaque["linear"]
        assert _count_ops(explain, torch.ops.oqcore.moe_forward) == opaque["moe"] == len(moes)
        bad = []
        for name, x in xs.items():
            dt = (x[0] if isinstance(x, tuple) else x).dtype
            outs = eager[name] if isinstance(eager[name], tuple) else (eager[name],)
            outs_c = compiled[name] if isinstance(compiled[name], tuple) else (compiled[name],)
            assert {t.dtype for t in (*outs, *outs_c)} == {dt}, name
        for name, mlp in zoo.mlps.items():
            if mlp.up.method.backend.traceable:
                bad += _mlp_mismatch(name, mlp, xs[name], eager[name], compiled[name])
            elif not (torch.equal(eager[name][0], compiled[name][0]) and torch.equal(eager[name][1], compiled[name][1])):
                bad.append(f"{name}: not bit-identical")
        bad += [f"{n}: not bit-identical" for n in zoo.moes if not torch.equal(eager[n], compiled[n])]
    torch._dynamo.reset()
    assert not bad, "compiled != eager: " + "; ".join(bad)


# ---- the live layer behind the key: reload, copies, errors ---------------------------------------


class Block(nn.Module):
    """An MLP and a Mixtral experts block: ``(x [M, K], (xm [T, H], ids, weights))``."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.mlp, self.experts = MLP(), copy.deepcopy(experts)

    def forward(self, x: torch.Tensor, moe_in: tuple) -> tuple:
        return self.mlp(x), self.experts(*moe_in)


def _block_inputs(block: Block, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    lay = block.experts.layout
    moe_in = (torch.randn(T, lay.hidden_size, generator=gen), torch.randint(0, lay.num_experts, (T, 2), generator=gen), torch.rand(T, 2, generator=gen))
    return torch.randn(T, K, generator=gen) * 3, moe_in


def test_reload_weights_into_a_compiled_model(experts_by_arch, monkeypatch):
    """:func:`oqcore.reload_weights` in place on a compiled model: the op reads the live tensors
    (and inductor's graph the parameters it was given), so the compiled output changes and equals
    the eager forward of the new weights, for each backend the planner offers for both kinds
    (the traceable ``torch`` linear and the opaque experts; the kernels where offered)."""
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    mix = experts_by_arch["mixtral"]
    plain = Block(mix)
    backends = sorted(set(_viable(plain, "fp8_per_block", "linear")) & set(_viable(plain, "fp8_per_block", "moe")))
    assert "torch" in backends, backends
    torch.manual_seed(1)
    fresh = {n: t * 2 + 0.01 for n, t in Block(mix).state_dict().items()}  # other weights, same names
    for backend in backends:
        torch.manual_seed(0)
        block = oqcore.quantize_(Block(mix), {"scheme": "fp8_per_block", "backend": {"linear": backend, "moe": backend}})
        x, moe_in = _block_inputs(block, 0)
        torch._dynamo.reset()
        compiled = torch.compile(block)
        with torch.no_grad():
            before = compiled(x, moe_in)
            touched = oqcore.reload_weights(block, fresh)
            assert sorted(touched) == ["experts", "mlp.down", "mlp.up"], touched
            (mlp_e, moe_e), (mlp_c, moe_c) = block(x, moe_in), compiled(x, moe_in)
        torch._dynamo.reset()
        assert not torch.equal(mlp_c[1], before[0][1]) and not torch.equal(moe_c, before[1]), backend
        bad = _mlp_mismatch(f"{backend} mlp", block.mlp, x, mlp_e, mlp_c) + _moe_mismatch(f"{backend} experts", block.experts, moe_e, moe_c)
        assert not bad, "; ".join(bad)


def test_copies_get_their_own_key(experts_by_arch, monkeypatch):
    """``copy.deepcopy`` and :func:`oqcore.modules.empty_like` give a wrapper a key of its own, so a
    graph compiled for one wrapper never runs another's weights (Dynamo guards on the key)."""
    from oqcore import compiled_ops
    from oqcore.modules import empty_like

    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    torch.manual_seed(0)
    block = oqcore.quantize_(Block(experts_by_arch["mixtral"]), {"scheme": "fp8_per_block", "backend": {"linear": "torch", "moe": "torch"}})
    twin = copy.deepcopy(block)
    wrappers = [block.mlp.up, block.experts, twin.mlp.up, twin.experts, empty_like(block.mlp.up), empty_like(block.experts)]
    keys = [w.compile_key for w in wrappers]
    assert len(set(keys)) == len(keys), keys
    assert all(compiled_ops.lookup(k) is w for k, w in zip(keys, wrappers))
    with torch.no_grad():
        for p in twin.experts.parameters():
            p.view(torch.uint8).copy_(p.view(torch.uint8).roll(1, 0)) if p.element_size() == 1 else p.mul_(0.5)
        x, moe_in = _block_inputs(block, 2)
        torch._dynamo.reset()
        a, b = torch.compile(block, backend="eager")(x, moe_in), torch.compile(twin, backend="eager")(x, moe_in)
        assert torch.equal(a[1], block(x, moe_in)[1]) and torch.equal(b[1], twin(x, moe_in)[1])
        assert not torch.equal(a[1], b[1])
    torch._dynamo.reset()


def test_errors_surface_as_themselves(experts_by_arch, monkeypatch):
    """An :class:`oqcore.OqError` raised by a layer's forward inside the op leaves as itself, not
    wrapped, eagerly through the op and from a compiled model (the op runs at run time; its fake
    implementation never calls the forward). A key no live layer holds is an
    :class:`oqcore.InternalError` naming the key."""
    from oqcore import compiled_ops
    from oqcore.errors import InternalError, UnsupportedLayerError

    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    torch.manual_seed(0)
    block = oqcore.quantize_(Block(experts_by_arch["mixtral"]), {"scheme": "fp8_per_block", "backend": {"linear": "torch", "moe": "torch"}})
    x, moe_in = _block_inputs(block, 3)

    def boom(layer, *args):
        raise UnsupportedLayerError(layer.layer_name, "boom from the forward")

    monkeypatch.setattr(block.experts.method, "apply", boom)
    with raises_naming(UnsupportedLayerError, "experts", "boom") as info:
        compiled_ops.moe_forward(*moe_in, block.experts.compile_key)
    assert type(info.value) is UnsupportedLayerError
    for backend in ("eager", "inductor"):
        torch._dynamo.reset()
        with raises_naming(UnsupportedLayerError, "experts", "boom") as info, torch.no_grad():
            torch.compile(block, backend=backend)(x, moe_in)
        assert type(info.value) is UnsupportedLayerError, backend
    torch._dynamo.reset()
    with raises_naming(InternalError, "'gone#0'", "no live quantized layer"):
        compiled_ops.linear_forward(x, "gone#0")


def test_gradients_through_the_ops_equal_eager(experts_by_arch, monkeypatch):
    """A compiled model called with inputs that require grad (no ``torch.no_grad()``) traces the
    ops' autograd: the backward op re-runs the eager forward under autograd, so the gradients
    w.r.t. the input and the routing weights are eager's bit for bit (the differentiable ``torch``
    experts loop), and a backend whose eager output is not differentiable (the C kernels) gives a
    zero gradient where eager gives none."""
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    torch.manual_seed(0)
    experts = experts_by_arch["mixtral"]
    holder = oqcore.quantize_(nn.ModuleDict({"experts": copy.deepcopy(experts)}), {"scheme": "fp8_per_block", "backend": {"moe": "torch"}})
    block = holder["experts"]
    h, e = block.layout.hidden_size, block.layout.num_experts
    gen = torch.Generator().manual_seed(5)
    x, ids, w = torch.randn(T, h, generator=gen), torch.randint(0, e, (T, 2), generator=gen), torch.rand(T, 2, generator=gen)
    probe = torch.randn(T, h, generator=gen)

    def grads(fn):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, ids, ww)
        (y * probe).sum().backward()
        return y.detach(), xx.grad, ww.grad

    torch._dynamo.reset()
    eager, compiled = grads(block), grads(torch.compile(block))
    torch._dynamo.reset()
    assert eager[1].abs().max() > 0 and eager[2].abs().max() > 0
    for what, e, c in zip(("output", "d/dx", "d/dtopk_weights"), eager, compiled):
        assert torch.equal(e, c), what

    mlp = oqcore.quantize_(MLP(), {"scheme": "fp8_per_block", "backend": {"linear": "cpu"}})
    xx = (torch.randn(T, K, generator=gen) * 3).requires_grad_()
    _, y_e = mlp(xx)
    assert not y_e.requires_grad  # the C kernel's eager output has no grad_fn
    _, y_c = torch.compile(mlp)(xx)
    y_c.sum().backward()
    torch._dynamo.reset()
    assert torch.equal(y_c.detach(), y_e) and torch.equal(xx.grad, torch.zeros_like(xx))
