"""The compiled (torch.compile) CPU NVFP4 quantizer against the torch reference (itself byte for byte
compressed-tensors 0.20.1): identical packed e2m1, e4m3 scale and global-scale bytes on zero,
-0.0, subnormal, huge, tie and mixed-magnitude blocks (bf16), and a float32 expert stack with
per-expert global-scale overrides. The cases are packed into one ``[64, 160]`` matrix per dtype so only a few
shapes compile."""

import pytest
import torch

from oq_plugin_nvfp4.compiled import quantize_nvfp4_compiled
from oq_plugin_nvfp4.quant import quantize_nvfp4


@pytest.fixture(autouse=True)
def _compile_on(monkeypatch):
    monkeypatch.setenv("OQ_COMPILE", "1")


def adversarial() -> torch.Tensor:
    """``[64, 160]`` float32: 640 blocks of 16."""
    g = torch.Generator().manual_seed(5)
    ties = torch.cat([torch.full((7, 1), 6.0), (torch.arange(-52, 53, dtype=torch.float32) / 8).reshape(7, 15)], 1)
    bits = torch.randint(1, 0x7F7FFFFF, (200,), dtype=torch.int32, generator=g).view(torch.float32)
    edge = (torch.rand(200, 16, generator=g) * 2 - 1) * bits[:, None]
    edge[:, 5] = -bits
    special = torch.stack([torch.zeros(16), torch.full((16,), -0.0), torch.randn(16, generator=g) * 1e-40,
                           torch.randn(16, generator=g) * 1e-30 + torch.eye(16)[0] * 1e30])
    mixed = torch.randn(100, 16, generator=g) * torch.logspace(-30, 30, 100)[:, None]
    blocks = torch.cat([ties, edge, special, mixed])
    blocks = torch.cat([blocks, torch.randn(640 - blocks.shape[0], 16, generator=g)])
    return blocks.reshape(64, 160)


def _differing(a, b) -> list[str]:
    """Names of the (qdata, scale, global_scale) tensors whose dtype, shape or bytes differ."""
    names = ("qdata", "scale", "global_scale")
    return [
        n
        for n, x, y in zip(names, a, b)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    ]


def test_bytes_equal_reference():
    w = adversarial().bfloat16()
    assert not _differing(quantize_nvfp4_compiled(w), quantize_nvfp4(w))
    x = torch.randn(64, 160, generator=torch.Generator().manual_seed(6)).bfloat16() * 5
    assert not _differing(quantize_nvfp4_compiled(x), quantize_nvfp4(x))  # same signature: no recompile


def test_expert_stack_override_and_errors():
    """float32 [E, N, K] with per-expert global scales given (one more compiled signature)."""
    w = adversarial().reshape(4, 16, 160) * torch.tensor([1.0, 0.0, 1e-20, 1e20]).reshape(4, 1, 1)
    g = torch.tensor([[448.0], [1.0], [3e22], [1e-17]])
    assert not _differing(quantize_nvfp4_compiled(w, global_scale=g), quantize_nvfp4(w, global_scale=g))
    with pytest.raises(ValueError, match="divisible by 16"):
        quantize_nvfp4_compiled(torch.randn(4, 40))
    assert not _differing(quantize_nvfp4_compiled(torch.empty(0, 32)), quantize_nvfp4(torch.empty(0, 32)))
