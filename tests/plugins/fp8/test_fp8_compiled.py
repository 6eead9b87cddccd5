"""The compiled (torch.compile) CPU fp8 quantizers against the torch reference: identical qdata
bytes and scales for all six keys on adversarial inputs (zero rows and 128x128 blocks, -0.0,
float32 subnormals, scales that underflow to eps, huge and mixed magnitudes, fp8 rounding ties),
bf16 and float32, shapes that are not multiples of 128, and a 3D expert stack.

Compiling is the slow part (seconds per new shape), so every key runs on the same two small
matrices (one per dtype) and one 3D stack; the compiled graphs are shared across tests."""

import pytest
import torch

import oqcore
from oq_plugin_fp8.quant import GROUPINGS, TORCH_QUANTIZERS

KEYS = list(GROUPINGS)
FP8_GRID = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # +0 .. 448


@pytest.fixture(autouse=True)
def _compile_on(monkeypatch):
    monkeypatch.setenv("OQ_COMPILE", "1")


def adversarial(dtype: torch.dtype) -> torch.Tensor:
    """``[192, 160]``: N and K not multiples of 128 (partial edge blocks and groups)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(192, 160, generator=g) * torch.logspace(-4, 4, 192)[:, None]
    x[3] = 0.0  # zero row / zero 1x128 groups
    x[4] = -0.0  # -0.0 must come out +0 (compressed-tensors' "+ 0.0")
    x[5] = torch.randn(160, generator=g) * 1e-40  # float32 (and bf16) subnormals
    x[6] = torch.randn(160, generator=g) * 1e-43  # amax / 448 underflows to 0 -> eps (float32)
    x[7] = torch.randn(160, generator=g) * 1e37  # huge
    x[8] = torch.randn(160, generator=g) * 1e-30
    x[8, 17] = 3e30  # mixed: tiny elements of a huge row round to +-0
    # exact fp8 rounding ties and carries into the next exponent, with amax 448 (scale exactly 1)
    mids = (FP8_GRID[1:] + FP8_GRID[:-1]) / 2
    x[9, :126] = mids
    x[9, 126:] = 448.0
    x[10, :126] = -mids
    x[10, 126] = -448.0
    x[128:, :128] = 0.0  # an all-zero (partial) 128x128 block
    x[100:110, 130:] = -0.0
    return x.to(dtype)


def check(w: torch.Tensor, key: str) -> None:
    ref = TORCH_QUANTIZERS[key][0]
    q_ref, s_ref = ref(w)
    qt = oqcore.quantize_tensor(w, key, quantizer="compiled", role="activation" if "dynamic" in key or "token" in key else "weight")
    q, s = qt.qdata, qt.scale
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == s_ref.shape
    assert torch.equal(s, s_ref), f"{key}: scales differ"
    qb, rb = q.view(torch.uint8), q_ref.view(torch.uint8)
    assert torch.equal(qb, rb), f"{key}: {int((qb != rb).sum())} bytes differ, e.g. w={w[qb != rb][:4].tolist()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("key", KEYS)
def test_compiled_bit_exact_2d(key, dtype):
    check(adversarial(dtype), key)


@pytest.mark.parametrize("key", ["fp8_per_tensor_static", "fp8_per_block_static"])
def test_compiled_bit_exact_degenerate_same_shape(key):
    # all-zero and all-subnormal tensors: the per-tensor / per-block scale falls back to eps
    # (same shape as above, so no new compile)
    check(torch.zeros(192, 160, dtype=torch.bfloat16), key)
    check((torch.randn(192, 160) * 1e-43).float(), key)


def test_compiled_3d_expert_stack():
    # every expert gets its own scales; expert 1 is all zeros
    w = torch.randn(3, 136, 96).bfloat16()
    w[1] = 0.0
    check(w, "fp8_per_block_static")


def test_compiled_is_registered_for_every_key_and_tiny_inputs_match():
    reg = oqcore.plugins.get_registry()
    for key in KEYS:
        k = reg.resolve_key(key, "activation" if "dynamic" in key or "token" in key else "weight")
        assert (k, "compiled") in reg.quantizers
    # empty input: goes to the reference without compiling
    q, s = TORCH_QUANTIZERS["fp8_per_token"][0](torch.empty(0, 160))
    from oq_plugin_fp8.compiled import quantize_grouped_compiled

    q2, s2 = quantize_grouped_compiled(torch.empty(0, 160), GROUPINGS["fp8_per_token"])
    assert q2.shape == q.shape and s2.shape == s.shape


def test_eager_fallback_same_bytes(monkeypatch):
    # OQ_COMPILE=0 runs the same graph function eagerly: the bytes must not depend on compiling
    monkeypatch.setenv("OQ_COMPILE", "0")
    w = adversarial(torch.float32)[:, :100]
    for key in KEYS:
        check(w, key)


def test_compiled_records_first_call_and_does_not_compile_at_import():
    import subprocess
    import sys

    code = (
        "import sys, oqcore, oq_plugin_fp8.compiled as c; oqcore.plugins.get_registry();"
        "assert c._compiled_group_graph is None; print('torch._inductor' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    from oq_plugin_fp8 import compiled as c

    check(adversarial(torch.bfloat16), "fp8_per_channel_static")
    fn = c._compiled_group_graph
    assert fn.failed is None and fn.first_call_seconds
    # every signature really got its own compiled entry (none fell back to eager at dynamo's limit)
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    assert len(_debug_get_cache_entry_list(fn.fn.__code__)) == len(fn.first_call_seconds)
