"""``torch.compile`` (inductor, CPU) of quantized models gives the eager forward's numbers.

One "zoo" module holds a branch per (scheme, activation, backend, shape class), each backend pinned
(Triton is off: ``OQ_DISABLE_TRITON=1``; its interpreter is a testing path), so the planner's
defaults can change without changing what is tested here (``tests/test_compile_explain.py`` covers
every backend the planner offers on the CPU, derived from it). It is
compiled once and run at batch 1 (the C kernels' GEMV path) and batch 5 (> 4: the tiled path), so
the compile cost (seconds per graph on 2 cores) is paid twice for the whole matrix. Shape classes:
K % 128 != 0 (partial 1x128 / 128x128 groups along K), N % 128 != 0 (partial blocks along N),
K % 32 == 0 but K % 128 != 0 (mxfp8), both dims partial, and whole blocks.

The bound (stated once, used everywhere): for every output element,
``|compiled - eager| <= 2 * K * eps32 * (|x_q| @ |W|^T + |b|)[m, n]`` (+ one ulp of the output dtype
for bf16 outputs), with ``x_q`` the eager fake-quantized activations and ``W`` the dequantized
weight: the summation-order error of a float32 dot product of length K, twice. Anything larger is a
different quantization of some element (e.g. a wrong fp8 rounding, or the NaN/garbage the partial
block bug produced), which this bound rejects. (In practice the outputs are bit-identical.)

Root causes these tests pin (torch 2.13 CPU): inductor's C++ loop split drops the tail of loops
indexed by ``k // 128`` (fp8 partial groups -> NaN), inductor cannot read float8_e8m0fnu tensors
(mxfp8 ``KeyError``), and Dynamo frees tensors whose ``data_ptr()`` a ctypes call still needs (the
``cpu`` backend's C kernel at batch <= 4 -> garbage). See ``oq_plugin_fp8.ops`` / ``oq_plugin_mxfp8.ops``.
Backends that are not :attr:`oqcore.Backend.traceable` (every one but the linear ``torch``
reference) now run under compile as the opaque op ``oqcore::linear_forward`` /
``oqcore::moe_forward`` (:mod:`oqcore.compiled_ops`), which calls the eager forward.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import oqcore
from oqcore.modules import QuantizedMoE

EPS32 = torch.finfo(torch.float32).eps

# (name, weight key, activation key, options, pinned backend, K, N, dtype)
BRANCHES = [
    ("t_wo_cpu", "fp8_per_tensor_static", None, {}, "cpu", 200, 72, torch.float32),
    ("t_wo_torch", "fp8_per_tensor_static", None, {}, "torch", 200, 72, torch.float32),
    ("t_a_tensor", "fp8_per_tensor_static", "fp8_per_tensor_dynamic", {}, "torch", 200, 72, torch.float32),
    ("t_a_token", "fp8_per_tensor_static", "fp8_per_token", {}, "torch", 200, 72, torch.float32),
    ("c_wo_cpu", "fp8_per_channel_static", None, {}, "cpu", 200, 136, torch.float32),
    ("c_wo_torch", "fp8_per_channel_static", None, {}, "torch", 200, 136, torch.float32),
    ("c_a_token", "fp8_per_channel_static", "fp8_per_token", {}, "torch", 200, 136, torch.float32),
    ("c_a_tensor", "fp8_per_channel_static", "fp8_per_tensor_dynamic", {}, "torch", 200, 136, torch.float32),
    # 128x128 blocks: K partial (N < 128), both partial, N partial only, whole blocks
    ("b_wo_cpu_k", "fp8_per_block_static", None, {}, "cpu", 200, 72, torch.float32),
    ("b_wo_torch_k", "fp8_per_block_static", None, {}, "torch", 200, 72, torch.float32),
    ("b_a_k", "fp8_per_block_static", "fp8_per_block_dynamic", {}, "torch", 200, 72, torch.float32),
    ("b_wo_torch_nk", "fp8_per_block_static", None, {}, "torch", 224, 200, torch.float32),
    ("b_a_nk", "fp8_per_block_static", "fp8_per_block_dynamic", {}, "torch", 224, 200, torch.float32),
    ("b_wo_torch_n", "fp8_per_block_static", None, {}, "torch", 256, 136, torch.float32),
    ("b_a_n", "fp8_per_block_static", "fp8_per_block_dynamic", {}, "torch", 256, 136, torch.float32),
    ("b_a_whole", "fp8_per_block_static", "fp8_per_block_dynamic", {}, "torch", 128, 128, torch.float32),
    ("b_a_k_bf16", "fp8_per_block_static", "fp8_per_block_dynamic", {}, "torch", 200, 72, torch.bfloat16),
    # mxfp8 (K % 32 == 0, K % 128 != 0), both scale rules
    ("mx_wo_cpu", "mxfp8", None, {}, "cpu", 224, 72, torch.float32),
    ("mx_wo_torch", "mxfp8", None, {}, "torch", 224, 72, torch.float32),
    ("mx_a", "mxfp8", "mxfp8", {}, "torch", 224, 72, torch.float32),
    ("mx_a_n", "mxfp8", "mxfp8", {}, "torch", 160, 200, torch.float32),
    ("mxf_wo_cpu", "mxfp8", None, {"scale_mode": "floor"}, "cpu", 224, 72, torch.float32),
    ("mxf_wo_torch", "mxfp8", None, {"scale_mode": "floor"}, "torch", 224, 72, torch.float32),
    ("mxf_a", "mxfp8", "mxfp8", {"scale_mode": "floor"}, "torch", 224, 72, torch.float32),
    ("mx_wo_cpu_bf16", "mxfp8", None, {}, "cpu", 224, 72, torch.bfloat16),
    # int8: K % 16 == 0 runs torch._weight_int8pack_mm (cpu-int8), otherwise the reference
    ("i_wo_cpu", "int8_per_channel_static", None, {}, "cpu-int8", 208, 72, torch.float32),
    ("i_wo_torch", "int8_per_channel_static", None, {}, "torch", 200, 72, torch.float32),
    ("i_a_token", "int8_per_channel_static", "int8_per_token", {}, "torch", 200, 72, torch.float32),
]


class Zoo(nn.Module):
    """One quantized single-linear branch per entry of :data:`BRANCHES`; ``forward(xs)`` maps each
    branch's input ``[M, K]`` to its output ``[M, N]``."""

    def __init__(self, branches: dict[str, nn.Module]):
        super().__init__()
        self.branches = nn.ModuleDict(branches)

    def forward(self, xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: branch(xs[name]) for name, branch in self.branches.items()}


@pytest.fixture(scope="module")
def zoo():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OQ_DISABLE_TRITON", "1")
        torch.manual_seed(0)
        branches = {}
        for name, w, act, opts, pin, k, n, dt in BRANCHES:
            lin = nn.Linear(k, n, bias=name.startswith(("t_", "b_a_k", "mx_a"))).to(dt)
            cfg = {"linear": {"weight": w, "activation": act, "options": opts}, "backend": {"linear": pin}}
            branches[name] = oqcore.quantize_(nn.Sequential(lin), cfg)
        model = Zoo(branches).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model)
    yield model, compiled
    torch._dynamo.reset()


def test_zoo_plans_the_pinned_backends(zoo):
    """Each branch runs its pinned backend; only the linear ``torch`` reference is traced by
    Dynamo/inductor, every other backend is one opaque op under compile."""
    model, _ = zoo
    for name, _, _, _, pin, *_ in BRANCHES:
        backend = model.branches[name][0].method.backend
        assert (backend.name, backend.traceable) == (pin, pin == "torch"), name


def _bound(layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The per-element bound of the module docstring for ``layer`` (a QuantizedLinear) on ``x``."""
    m = layer.method
    xq = m.fake_quantize_activation(x.float()).float()
    w = m.dequantize_weight(layer.weight, layer.weight_scale, torch.float32)
    mag = xq.abs() @ w.abs().t()
    if layer.bias is not None:
        mag = mag + layer.bias.float().abs()
    bound = 2 * x.shape[-1] * EPS32 * mag
    if y.dtype != torch.float32:
        bound = bound + torch.finfo(y.dtype).eps * y.float().abs()  # one ulp of the output's rounding
    return bound


@pytest.mark.parametrize("batch", [1, 5])
def test_compiled_equals_eager(zoo, batch):
    model, compiled = zoo
    gen = torch.Generator().manual_seed(batch)
    xs = {
        name: (torch.randn(batch, k, generator=gen) * 3).to(dt)
        for name, _, _, _, _, k, _, dt in BRANCHES
    }
    with torch.no_grad():
        eager = model(xs)
        out = compiled(xs)
    bad = []
    for name, *_ in BRANCHES:
        e, c = eager[name], out[name]
        assert c.shape == e.shape and c.dtype == e.dtype, name
        assert torch.isfinite(e).all(), name
        err = (c.float() - e.float()).abs()
        bound = _bound(model.branches[name][0], xs[name], e)
        if not (err <= bound).all():
            bad.append(f"{name}: max err {err.max().item():.3g}, bound {bound.max().item():.3g}")
    assert not bad, "compiled != eager: " + "; ".join(bad)


KERNEL_BRANCHES = [b[0] for b in BRANCHES if b[4] != "torch"]


@pytest.mark.parametrize("name", KERNEL_BRANCHES)
def test_kernel_traced_as_one_op(zoo, name):
    """A kernel backend's layer runs as the one op ``oqcore::linear_forward`` (the eager forward,
    C kernel included): no graph break, nothing of the kernel in the graph, and Dynamo's tracing
    (the ``eager`` backend isolates it from inductor) gives the eager numbers at both batch paths.
    Traced as a ctypes call, Dynamo freed ``x.float()`` before the kernel read it (garbage at batch 1)."""
    model, _ = zoo
    branch = model.branches[name]
    k, dt = next((b[5], b[7]) for b in BRANCHES if b[0] == name)
    gen = torch.Generator().manual_seed(1)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(branch)(torch.randn(1, k, generator=gen).to(dt))
    assert explain.graph_break_count == 0, explain.break_reasons
    ops = {n.target for g in explain.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert ops and ops <= {torch.ops.oqcore.linear_forward, torch.ops.oqcore.linear_forward.default}, ops
    torch._dynamo.reset()
    traced = torch.compile(branch, backend="eager")
    for batch in (1, 5):
        x = torch.randn(batch, k, generator=gen).to(dt)
        with torch.no_grad():
            assert torch.equal(traced(x), branch(x)), (name, batch)
    torch._dynamo.reset()


# ---- MoE: the expert loop runs inside one opaque op (no graph break), results must match ----------

MOE_CASES = [
    # (weight, activation, pinned backend); H = 160 (% 128 != 0), I = 96, 2I = 192
    ("fp8_per_block_static", "fp8_per_block_dynamic", "torch"),
    ("int8_per_channel_static", None, "cpu-int8"),
    ("mxfp8", None, "cpu"),
]


@pytest.mark.parametrize("weight,act,backend", MOE_CASES, ids=[c[0] for c in MOE_CASES])
def test_moe_compiled_equals_eager(tiny_moe, monkeypatch, weight, act, backend):
    """The experts' data-dependent loop (which used to break the graph at every expert) is the op
    ``oqcore::moe_forward``: zero graph breaks, and the compiled result is within the linear bound
    with K = H + I of eager (in practice bit-identical: the op runs the eager forward)."""
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    cfg = {"moe": {"weight": weight, "activation": act}, "backend": {"moe": backend}}
    model = oqcore.load(tiny_moe("mixtral"), cfg, dtype=torch.float32)
    experts = next(m for m in model.modules() if isinstance(m, QuantizedMoE))
    assert experts.method.backend.name == backend and not experts.method.backend.traceable
    lay = experts.layout
    gen = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    x = torch.randn(5, lay.hidden_size, generator=gen)
    ids = torch.randint(0, lay.num_experts, (5, 2), generator=gen)
    explain = torch._dynamo.explain(experts)(x, ids, torch.rand(5, 2, generator=gen))
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(experts)
    for t in (6, 1):
        x = torch.randn(t, lay.hidden_size, generator=gen)
        ids = torch.randint(0, lay.num_experts, (t, 2), generator=gen)
        w = torch.rand(t, 2, generator=gen)
        with torch.no_grad():
            e, c = experts(x, ids, w), compiled(x, ids, w)
        assert torch.isfinite(e).all()
        # per-expert outputs summed with top-k weights <= 1: the linear bound with K = H + I
        tol = 2 * (lay.hidden_size + lay.intermediate_size) * EPS32 * (e.abs().max() + 1)
        assert (c - e).abs().max() <= tol, (t, (c - e).abs().max())
    torch._dynamo.reset()
