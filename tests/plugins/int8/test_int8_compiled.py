"""The compiled (torch.compile) CPU int8 quantizer against the torch reference: identical int8
bytes and float32 scales for both keys, on zero rows, -0.0, float32 subnormals, scales that
underflow to eps, huge and mixed magnitudes and exact .5 rounding ties, in bf16 and float32, and
for a 3D expert stack. Few shapes, one compiled graph shared by all tests (compiling is slow)."""

import pytest
import torch

import oqcore
from oq_plugin_int8.quant import quantize_int8_rowwise


@pytest.fixture(autouse=True)
def _compile_on(monkeypatch):
    monkeypatch.setenv("OQ_COMPILE", "1")


def adversarial(dtype: torch.dtype) -> torch.Tensor:
    """``[64, 160]`` (K not a multiple of 128)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 160, generator=g) * torch.logspace(-5, 5, 64)[:, None]
    x[1] = 0.0
    x[2] = -0.0
    x[3] = torch.randn(160, generator=g) * 1e-40  # subnormal
    x[4] = torch.randn(160, generator=g) * 1e-43  # amax / 127 underflows -> eps (float32)
    x[5] = torch.randn(160, generator=g) * 1e37
    x[6] = torch.randn(160, generator=g) * 1e-30
    x[6, 9] = 2e30  # mixed magnitudes in one row
    # amax 127 -> scale exactly 1: x / scale hits every .5 tie (round half to even)
    x[7, :127] = torch.arange(-63, 64, dtype=torch.float32) + 0.5
    x[7, 127:] = 127.0
    return x.to(dtype)


def check(x: torch.Tensor, key: str) -> None:
    q_ref, s_ref = quantize_int8_rowwise(x)
    qt = oqcore.quantize_tensor(x, key, quantizer="compiled", role="activation" if key == "int8_per_token" else "weight")
    assert qt.qdata.dtype == torch.int8 and qt.qdata.shape == x.shape
    assert qt.scale.shape == s_ref.shape and torch.equal(qt.scale, s_ref)
    assert torch.equal(qt.qdata, q_ref), f"{int((qt.qdata != q_ref).sum())} values differ"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("key", ["int8_per_channel_static", "int8_per_token"])
def test_compiled_bit_exact(key, dtype):
    check(adversarial(dtype), key)


def test_compiled_3d_and_eager_fallback(monkeypatch):
    w = adversarial(torch.bfloat16).reshape(2, 32, 160)
    check(w, "int8_per_channel_static")
    monkeypatch.setenv("OQ_COMPILE", "0")  # same graph function run eagerly: same bytes
    check(adversarial(torch.float32)[:, :96], "int8_per_channel_static")


def test_compiled_graph_really_compiled_and_empty_input():
    from oq_plugin_int8.compiled import _state, quantize_int8_rowwise_compiled

    q, s = quantize_int8_rowwise_compiled(torch.empty(0, 16))
    assert q.shape == (0, 16) and s.shape == (0, 1)
    check(adversarial(torch.bfloat16), "int8_per_channel_static")
    fn = _state["fn"]
    assert fn.failed is None and fn.first_call_seconds
