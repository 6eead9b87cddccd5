"""MXFP8 linear method: plan-time checks, config/options, role-aware keys, NaN weights, backends
and the oracle, output accuracy (torch reference) and the Triton GEMM against the reference."""

import pytest
import torch
from torch import nn

import oqcore
from oqcore.metrics import sqnr
from oqcore.modules import QuantizedLinear
from oq_plugin_mxfp8.keys import kMxfp8Dynamic, kMxfp8Static
from oq_plugin_mxfp8.scheme import Mxfp8Linear

NAME = "model.layers.0.q_proj"


def candidates(kind):
    """Every forward backend offered for mxfp8 weights (the scheme's and the core's ``torch`` reference)."""
    return oqcore.get_plugin_manager().backend_candidates(kind, kMxfp8Static)


def backend(name: str, act):
    return next(b for b in candidates("linear") if b.name == name and b.activation_key == act)


def build(lin: nn.Linear, backend_name: str = "torch", act=kMxfp8Dynamic, options=None) -> QuantizedLinear:
    """A QuantizedLinear named NAME holding ``lin``'s weights, quantized."""
    bound = oqcore.plan(nn.Sequential(lin), {"linear": {"weight": "mxfp8", "options": options or {}}})["0"].bound
    m = bound.make_method(backend(backend_name, act), activation_key=act)
    ql = QuantizedLinear.from_linear(NAME, lin, m)
    ql.load_state_dict(lin.state_dict(), assign=True)
    m.process_weights_after_loading(ql)
    return ql


def test_role_aware_key_names():
    assert oqcore.quant_key("mxfp8") == kMxfp8Static and kMxfp8Static.scale.static
    assert oqcore.quant_key("mxfp8", "activation") == kMxfp8Dynamic and not kMxfp8Dynamic.scale.static


def test_method_declarations_and_plan():
    Mxfp8LinearMethod = oqcore.get_registry().method("linear", kMxfp8Static).cls  # derived from the Scheme
    assert Mxfp8LinearMethod.__name__ == "Mxfp8LinearMethod" and issubclass(Mxfp8LinearMethod, Mxfp8Linear)
    assert Mxfp8LinearMethod.weight_key == kMxfp8Static
    assert Mxfp8LinearMethod.supported_activation_keys == (None, kMxfp8Dynamic)
    lp = oqcore.plan(nn.Sequential(nn.Linear(64, 32)), {"linear": "mxfp8"})["0"]
    assert lp.bound.method_cls is Mxfp8LinearMethod
    assert lp.bound.activation_key == kMxfp8Dynamic  # vLLM's default: W8A8
    assert lp.bound.options.scale_mode == "rceil"
    # Under TRITON_INTERPRET=1 on CPU the triton backend wins on priority; its reason says why.
    assert lp.backend.name == "triton"
    reasons = {(c.backend.name, c.backend.activation_key): c.reason for c in lp.candidates}
    assert reasons[("torch", kMxfp8Dynamic)] is None
    assert "activation" in reasons[("triton", None)]
    lp2 = oqcore.plan(nn.Sequential(nn.Linear(64, 32)), {"linear": {"weight": "mxfp8", "activation": None}})["0"]
    assert lp2.bound.activation_key is None and lp2.backend.activation_key is None


def test_triton_not_supported_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = backend("triton", kMxfp8Dynamic).is_supported(nn.Linear(32, 32), torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET" in why and "sm_89" in why


def test_plan_rejects_k_not_divisible_by_32():
    with pytest.raises(oqcore.UnsupportedLayerError) as ei:
        oqcore.plan(nn.Sequential(nn.Linear(100, 64)), {"linear": "mxfp8"})
    assert ei.value.layer == "0"
    assert "K=100" in str(ei.value) and "'0'" in str(ei.value)


def test_bad_scale_mode_is_a_config_error():
    with pytest.raises(oqcore.ConfigError) as ei:
        oqcore.QuantizationConfig(linear={"weight": "mxfp8", "options": {"scale_mode": "nearest"}})
    assert ei.value.field == "linear.options.scale_mode"
    cfg = oqcore.QuantizationConfig(linear={"weight": "mxfp8", "options": {"scale_mode": "floor"}})
    assert cfg is not None


def test_nan_weight_is_an_error_naming_the_layer():
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight[3, 5] = float("inf")
    with pytest.raises(oqcore.UnsupportedLayerError) as ei:
        build(lin)
    assert ei.value.layer == NAME


def test_process_weights_layout_and_idempotent():
    lin = nn.Linear(128, 48)
    ql = build(lin)
    assert ql.weight.dtype == torch.float8_e4m3fn and ql.weight.shape == (48, 128)
    assert ql.weight_scale.dtype == torch.float8_e8m0fnu and ql.weight_scale.shape == (48, 4)
    w, s = ql.weight.clone(), ql.weight_scale.clone()
    ql.method.process_weights_after_loading(ql)
    assert torch.equal(ql.weight.view(torch.uint8), w.view(torch.uint8)) and torch.equal(ql.weight_scale.view(torch.uint8), s.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_output_sqnr(dtype):
    """Reference (torch) backend vs the unquantized layer: W8A8 >= 25 dB, W8A16 >= weight SQNR - 2 dB.
    Measured (seed 0, nn.Linear's uniform init): weight 32.6 dB, W8A16 32.5 dB, W8A8 29.0 dB
    (fp32 and bf16 alike)."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 128).to(dtype)
    x = torch.randn(4, 16, 256).to(dtype)
    y = lin(x).float()
    w8a8 = build(lin, act=kMxfp8Dynamic)
    w8a16 = build(lin, act=None)
    wq = oqcore.quantize_tensor(lin.weight.data, "mxfp8").dequantize(torch.float32)
    w_sqnr = sqnr(lin.weight.float(), wq)
    assert w_sqnr >= 28
    assert sqnr(y, w8a8(x).float()) >= 25
    assert sqnr(y, w8a16(x).float()) >= w_sqnr - 2
    assert w8a8(x).dtype == dtype and w8a8(x).shape == (4, 16, 128)


def test_zero_rows_give_exact_zero_outputs():
    lin = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        lin.weight[4] = 0.0
    ql = build(lin)
    assert torch.all(ql.weight_scale.view(torch.uint8)[4] == 0)
    y = ql(torch.randn(5, 64))
    assert torch.isfinite(y).all() and torch.equal(y[:, 4], torch.zeros(5))


@pytest.mark.parametrize("act", [kMxfp8Dynamic, None], ids=["w8a8", "w8a16"])
@pytest.mark.parametrize("mode", ["rceil", "floor"])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_gemm_matches_reference(act, mode, bias):
    """Triton GEMM vs the torch reference forward, float32 model: they compute the same products
    (fp8 x fp8, or fp32 x exactly-dequantized fp8, with IEEE fp32 dots) and differ only in the
    float32 summation order, so ``max|y_triton - y_ref| <= 1e-5 * max|y_ref|``."""
    torch.manual_seed(1)
    lin = nn.Linear(192, 80, bias=bias)
    x = torch.randn(3, 37, 192) * 3
    ref = build(lin, "torch", act, {"scale_mode": mode})(x)
    tri = build(lin, "triton", act, {"scale_mode": mode})(x)
    assert tri.shape == ref.shape
    assert (tri - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_triton_gemm_bf16_w8a16_within_one_bf16_rounding():
    """bf16 activations: the kernel dots bf16 x (fp8 -> bf16, exact) with float32 accumulation, the
    reference in float32; after the final cast to bf16 they differ by at most one bf16 ulp."""
    torch.manual_seed(2)
    lin = nn.Linear(128, 64).bfloat16()
    x = torch.randn(20, 128).bfloat16()
    ref = build(lin, "torch", None)(x).float()
    tri = build(lin, "triton", None)(x).float()
    assert torch.all((tri - ref).abs() <= 2.0**-7 * ref.abs() + 1e-6)


def test_mxfp8_gemm_kernel_direct():
    """The kernel alone on W8A8 operands vs dequantize-and-matmul (float32 order only)."""
    from oq_plugin_mxfp8.kernels.gemm import mxfp8_gemm
    from oq_plugin_mxfp8.quant import dequantize_mxfp8, quantize_mxfp8

    torch.manual_seed(3)
    a, sa = quantize_mxfp8(torch.randn(50, 96) * torch.logspace(-3, 3, 96))
    w, sw = quantize_mxfp8(torch.randn(70, 96))
    ref = dequantize_mxfp8(a, sa) @ dequantize_mxfp8(w, sw).T
    got = mxfp8_gemm(a, sa, w, sw)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_backend_candidates_of_the_scheme():
    got = {(b.name, b.activation_key, b.priority) for b in candidates("moe")}
    assert got == {
        ("torch", None, 0),
        ("torch", kMxfp8Dynamic, 0),
        ("triton", None, 100),
        ("triton", kMxfp8Dynamic, 100),
        ("cpu", None, 50),
        ("cpu", kMxfp8Dynamic, 50),
    }
    assert all(b.plugin == "mxfp8" for b in candidates("moe"))


def test_plugin_import_does_not_import_triton():
    import subprocess
    import sys

    code = (
        "import sys, oq_plugin_mxfp8.plugin as p, oq_plugin_mxfp8.backends, oq_plugin_mxfp8.scheme, "
        "oq_plugin_mxfp8.quant; print('triton' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
