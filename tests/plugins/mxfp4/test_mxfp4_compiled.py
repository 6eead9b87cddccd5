"""The compiled (torch.compile) CPU MXFP4 quantizer against the torch reference (itself bit-exact
with torchao ``to_mx``): identical packed e2m1 bytes and e8m0 scale bytes in both scale modes, on
the C quantizer tests' adversarial blocks (rceil's float32-log2 edges, floor's saturating maxima,
e2m1 ties, signed zeros, subnormal / huge / mixed magnitudes) plus NaN/Inf blocks. All blocks are
packed into one ``[N, 160]`` matrix per dtype so only three graphs compile."""

import pytest
import torch

from oq_plugin_mxfp4.compiled import _graph, quantize_mxfp4_compiled
from oq_plugin_mxfp4.quant import Mxfp4Options, quantize_mxfp4
from tests.plugins.mxfp4.test_mxfp4_cpu_quant import _cases


@pytest.fixture(autouse=True)
def _compile_on(monkeypatch):
    monkeypatch.setenv("OQ_COMPILE", "1")


def adversarial(dtype: torch.dtype) -> torch.Tensor:
    """Every 32-block of the C quantizer tests' cases, two NaN/Inf blocks, as ``[N, 160]``."""
    blocks = torch.cat([w.float().reshape(-1, 32) for w in _cases(dtype).values()])
    bad = torch.randn(2, 32)
    bad[0, 3], bad[1, 9] = float("nan"), float("inf")
    blocks = torch.cat([blocks, bad])
    blocks = torch.cat([blocks, torch.zeros((-blocks.shape[0]) % 5, 32)])
    return blocks.reshape(-1, 160).to(dtype)


@pytest.mark.parametrize(("dtype", "mode"), [(torch.bfloat16, "rceil"), (torch.bfloat16, "floor"), (torch.float32, "rceil")])
def test_compiled_bytes_equal_reference(dtype, mode):
    w = adversarial(dtype)
    o = Mxfp4Options(scale_mode=mode)
    q, e = quantize_mxfp4_compiled(w, o)
    assert _graph()[0].failed is None  # really compiled, not the eager fallback
    rq, re = quantize_mxfp4(w, o)
    assert q.dtype == torch.uint8 and e.dtype == torch.float8_e8m0fnu and q.shape == rq.shape and e.shape == re.shape
    assert torch.equal(e.view(torch.uint8), re.view(torch.uint8)), (e.view(torch.uint8) != re.view(torch.uint8)).nonzero()[:5].tolist()
    assert torch.equal(q, rq), (q != rq).nonzero()[:5].tolist()


def test_fallbacks_and_errors(monkeypatch):
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_mxfp4_compiled(torch.randn(4, 48))
    x = torch.randn(4, 64, dtype=torch.float64)  # not a compiled dtype: the reference
    assert torch.equal(quantize_mxfp4_compiled(x)[0], quantize_mxfp4(x)[0])
    monkeypatch.setenv("OQ_COMPILE", "0")  # eager run of the same graph
    y = torch.randn(7, 96)
    q, e = quantize_mxfp4_compiled(y, Mxfp4Options(scale_mode="floor"))
    rq, re = quantize_mxfp4(y, Mxfp4Options(scale_mode="floor"))
    assert torch.equal(q, rq) and torch.equal(e.view(torch.uint8), re.view(torch.uint8))
