"""Int8LinearMethod through QuantizedLinear: lifecycle, accuracy, and every backend (torch
reference, cpu-int8, Triton W8A16 / W8A8 under the interpreter) against the reference forward."""

import pytest
import torch
from torch import nn

import oqcore
from oqcore.metrics import sqnr
from oqcore.modules import QuantizedLinear
from oq_plugin_int8.backends import CPU_INT8_SCALE
from oq_plugin_int8.quant import quantize_int8_rowwise

NAME = "model.layers.0.q_proj"
W_ONLY = {"linear": {"weight": "int8_per_channel_static"}}
W8A8 = {"linear": {"weight": "int8_per_channel_static", "activation": "int8_per_token"}}


def make_layer(lin: nn.Linear, cfg: dict, backend: str, name: str = NAME) -> QuantizedLinear:
    """Plan ``lin``, build a method instance with the named backend, load ``lin``'s weights, quantize."""
    lp = oqcore.plan(nn.Sequential(lin), cfg)["0"]
    bound = lp.bound
    b = next(c.backend for c in lp.candidates if c.backend.name == backend and c.backend.activation_key == bound.activation_key)
    method = bound.make_method(b)
    layer = QuantizedLinear.from_linear(name, lin, method)
    layer.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
    if lin.bias is not None:
        layer.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    method.process_weights_after_loading(layer)
    return layer


def _linear(n, k, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.05)
    return lin.to(dtype)


def abs_dot(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    """``|x| @ |W_deq|.T``: the scale of the accumulation error of a length-K dot."""
    w = layer.weight.float() * layer.weight_scale
    return x.float().abs().reshape(-1, x.shape[-1]) @ w.abs().T


def test_lifecycle_and_idempotence():
    lin = _linear(48, 64, torch.float32)
    layer = make_layer(lin, W_ONLY, "torch")
    assert layer.quantized
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (48, 64)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (48, 1)
    q_ref, s_ref = quantize_int8_rowwise(lin.weight.detach())
    assert torch.equal(layer.weight, q_ref) and torch.equal(layer.weight_scale, s_ref)
    before = layer.weight.data_ptr()
    layer.method.process_weights_after_loading(layer)
    assert layer.weight.data_ptr() == before and torch.equal(layer.weight, q_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_output_sqnr(dtype):
    lin = _linear(256, 512, dtype, seed=1)
    layer = make_layer(lin, W_ONLY, "torch")
    w_db = sqnr(lin.weight.detach().float(), layer.weight.float() * layer.weight_scale)
    assert w_db >= 38.0, w_db
    x = torch.randn(16, 512).to(dtype)
    ref = nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())  # the unquantized layer, exact
    y = layer(x)
    assert y.dtype == dtype and y.shape == (16, 256)
    out_db = sqnr(ref, y)
    assert out_db >= w_db - 2.0, (out_db, w_db)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_w8a8_output_sqnr(backend):
    lin = _linear(128, 256, torch.bfloat16, seed=2)
    layer = make_layer(lin, W8A8, backend)
    x = torch.randn(8, 256).bfloat16()
    ref = nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    db = sqnr(ref, layer(x))
    assert db >= 25.0, db


def test_reference_forward_matches_manual_math():
    lin = _linear(32, 64, torch.float32, seed=3)
    layer = make_layer(lin, W8A8, "torch")
    x = torch.randn(2, 3, 64)
    xq, xs = quantize_int8_rowwise(x.reshape(-1, 64))
    manual = (xq.float() * xs) @ (layer.weight.float() * layer.weight_scale).T + lin.bias.detach()
    y = layer(x)
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y.reshape(-1, 32), manual, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_int8_matches_reference(dtype, bias):
    """Bound: the op runs in bf16 (x and scales rounded to bf16, each <= 2^-9 relative), so
    ``|y - ref| <= 2^-7 * (|x| @ |W|.T) + 2^-7 * |ref|`` (the last term: one bf16 output rounding)."""
    lin = _linear(96, 128, dtype, bias=bias, seed=4)
    ref_layer = make_layer(lin, W_ONLY, "torch")
    layer = make_layer(lin, W_ONLY, "cpu-int8")
    assert torch.equal(layer.weight, ref_layer.weight) and torch.equal(layer.weight_scale, ref_layer.weight_scale)
    s = getattr(layer, CPU_INT8_SCALE)
    assert s.dtype == torch.bfloat16 and s.shape == (96,)
    assert CPU_INT8_SCALE not in layer.state_dict()  # a runtime repack, not checkpoint state
    for m in (1, 5):
        x = torch.randn(m, 128).to(dtype)
        y, ref = layer(x), ref_layer(x)
        assert y.dtype == dtype
        bound = 2**-7 * abs_dot(x, layer) + 2**-7 * ref.float().abs()
        assert ((y.float() - ref.float()).abs() <= bound).all()
        assert sqnr(ref, y) >= 40.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [W_ONLY, W8A8], ids=["w8a16", "w8a8"])
def test_triton_gemm_matches_reference(dtype, cfg):
    """Bound: same integers and scales as the reference (the Triton quantizer is bit-exact), only
    the summation order differs: ``|y - ref| <= 1e-5 * (|x| @ |W|.T)`` in float32, plus one
    output-dtype rounding (``2^-8 |ref|`` for bf16) each side."""
    lin = _linear(80, 96, dtype, seed=5)  # N, K not multiples of the 64 tiles
    ref_layer = make_layer(lin, cfg, "torch")
    layer = make_layer(lin, cfg, "triton")
    for shape in ((1, 96), (3, 7, 96), (20, 96)):
        x = torch.randn(*shape).to(dtype)
        y, ref = layer(x), ref_layer(x)
        assert y.shape == (*shape[:-1], 80) and y.dtype == dtype
        tol = 1e-5 * abs_dot(x, layer).reshape(y.shape) + (2**-7 * ref.float().abs() if dtype == torch.bfloat16 else 1e-6)
        assert ((y.float() - ref.float()).abs() <= tol).all()


def test_zero_row_gives_exact_zero_outputs():
    lin = _linear(16, 32, torch.float32, bias=False, seed=6)
    with torch.no_grad():
        lin.weight[3] = 0
    for backend in ("torch", "cpu-int8", "triton"):
        layer = make_layer(lin, W_ONLY, backend)
        assert layer.weight_scale[3].item() == torch.finfo(torch.float32).eps
        assert (layer.weight[3] == 0).all()
        y = layer(torch.randn(4, 32))
        assert torch.isfinite(y).all() and (y[:, 3] == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_weight_raises_naming_layer(bad):
    lin = _linear(16, 32, torch.float32, seed=7)
    with torch.no_grad():
        lin.weight[2, 5] = bad
    with pytest.raises(oqcore.UnsupportedLayerError) as ei:
        make_layer(lin, W_ONLY, "torch")
    assert ei.value.layer == NAME and NAME in str(ei.value) and "NaN/Inf" in str(ei.value)
