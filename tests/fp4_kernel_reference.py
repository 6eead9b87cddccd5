"""Float32 references and error bounds for the MXFP4 / NVFP4 Triton kernel tests
(tests/plugins/mxfp4/test_mxfp4_triton.py, tests/plugins/nvfp4/test_nvfp4_triton.py).

Test weights are built from random e2m1 codes (``oq_plugin_mxfp4.fp4.pack_fp4``) and random scale
bytes, never through a quantizer, and dequantized with ``oq_plugin_mxfp4.fp4.dequantize_codes``
times the scales. The kernels and the references compute the same products; they differ only in
float32 rounding order, bounded per output element by :func:`gemm_bound`.

Bound (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 3.5 and lemma 3.1):
a float32 dot product of length K computed in any order has error at most ``gamma_K * sum |a_k w_k|``
with ``gamma_K = K u / (1 - K u)`` and ``u = 2**-24``. Each of the two computations carries that
error plus at most three more roundings per product or sum (the dequantization multiply, a scale
or global-scale multiply / division, the bias add), so their difference is at most
``2 (K + 3) u (1 + 0.01) (|a| @ |W|.T + |b|) <= (K + 4) 2**-23 (|a| @ |W|.T + |b|)`` for K < 10**5.
"""

from __future__ import annotations

import torch

U32 = 2.0**-24
"""Unit roundoff of float32."""


def random_codes(shape, g: torch.Generator) -> torch.Tensor:
    """Uniform e2m1 codes (uint8 0..15, every value and both zeros) of ``shape``."""
    return torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)


def gemm_bound(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise bound ``[M, N]`` on ``|kernel - reference|`` for ``a [M, K] @ w [N, K].T (+ bias)``
    (float32 operands, see the module docstring)."""
    k = a.shape[-1]
    mag = a.abs() @ w.abs().T
    if bias is not None:
        mag = mag + bias.float().abs()
    return (k + 4) * 2 * U32 * mag


def assert_within(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Every element of ``got`` within ``bound`` of ``ref`` (float32), with a message naming the
    worst element."""
    err = (got.float() - ref).abs()
    excess = err - bound
    assert torch.isfinite(got.float()).all(), f"{what}: non-finite output"
    if (excess > 0).any():
        i = int(excess.flatten().argmax())
        raise AssertionError(
            f"{what}: element {i} off by {err.flatten()[i].item():.3e}, bound {bound.flatten()[i].item():.3e} "
            f"(got {got.flatten()[i].item()!r}, reference {ref.flatten()[i].item()!r})"
        )


def cast_bound(ref: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bound after the kernel's float32 result is rounded to ``dtype`` (half an ulp, relative
    ``2**-p`` for a p-bit significand) and compared with the unrounded float32 reference."""
    if dtype == torch.float32:
        return bound
    rel = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    return bound + rel * (ref.abs() + bound)


def silu_concat(g: torch.Tensor) -> torch.Tensor:
    """Mixtral / Qwen3-MoE gate: ``silu(gate) * up`` on ``[gate | up]`` halves."""
    i = g.shape[-1] // 2
    return torch.nn.functional.silu(g[:, :i]) * g[:, i:]


def gptoss_interleaved(g: torch.Tensor) -> torch.Tensor:
    """GPT-OSS gate on interleaved columns (gate even, up odd), clamped at 7, alpha 1.702."""
    gate = g[:, 0::2].clamp(max=7.0)
    up = g[:, 1::2].clamp(min=-7.0, max=7.0)
    return (up + 1) * gate * torch.sigmoid(gate * 1.702)


class Recorder:
    """An ``apply_gate`` that records its float32 gate-up input, so the test can check the two
    GEMMs separately: the gate-up against an independent reference, the down GEMM against a
    reference fed with the kernel's own intermediate (a one-ulp difference in the gate-up output
    could otherwise flip a bf16 / fp8 rounding of the intermediate and dominate the comparison)."""

    def __init__(self, gate):
        self.gate = gate
        self.seen: torch.Tensor | None = None

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        assert g.dtype == torch.float32
        self.seen = g.clone()
        return self.gate(g)


def routed_pairs(topk_ids: torch.Tensor, num_experts: int) -> list[tuple[int, int, int]]:
    """``(pair, token, expert)`` for every (token, slot) routed to an expert in range."""
    k = topk_ids.shape[1]
    return [
        (t * k + j, t, int(topk_ids[t, j]))
        for t in range(topk_ids.shape[0])
        for j in range(k)
        if 0 <= int(topk_ids[t, j]) < num_experts
    ]


def check_moe(y, rec, a_in, h_in_of, topk_ids, topk_weights, w13d, b13, w2d, b2, out_dtype, what):
    """Check a fused-MoE result stage by stage.

    ``a_in [T, H]`` float32: the gate-up GEMM's input as the kernel sees it (``x``, or its MXFP8
    dequantization); ``h_in_of(h)``: the down GEMM's input (float32) from the float32 gated
    intermediate ``h`` (cast to the model dtype, or MXFP8-quantized and dequantized);
    ``w13d [E, 2I, H]`` / ``w2d [E, H, I]`` float32 dequantized experts, biases or None.
    Rows of the recorded gate-up output for unrouted pairs must be untouched zeros."""
    E = w13d.shape[0]
    T, top_k = topk_ids.shape
    g = rec.seen
    assert g is not None and g.shape == (T * top_k, w13d.shape[1])
    pairs = routed_pairs(topk_ids, E)
    routed = {p for p, _, _ in pairs}
    for p in range(T * top_k):
        if p not in routed:
            assert torch.equal(g[p], torch.zeros_like(g[p])), f"{what}: unrouted pair {p} was written"
    for p, t, e in pairs:
        bias = None if b13 is None else b13[e]
        ref = a_in[t : t + 1] @ w13d[e].T + (0 if bias is None else bias.float())
        assert_within(g[p : p + 1], ref, gemm_bound(a_in[t : t + 1], w13d[e], bias), f"{what} gate-up pair {p}")
    h = h_in_of(rec.gate(g))
    y_ref = torch.zeros((T, w2d.shape[1]), dtype=torch.float32)
    bound = torch.zeros_like(y_ref)
    for p, t, e in pairs:
        bias = None if b2 is None else b2[e]
        wt = topk_weights[t, p % top_k].float()
        y_ref[t] += wt * (h[p] @ w2d[e].T + (0 if bias is None else bias.float()))
        # + top_k: the weight multiply and the sum over slots add a rounding each per pair
        bound[t] += wt.abs() * gemm_bound(h[p : p + 1], w2d[e], bias)[0] * (1 + (top_k + 2) / (w2d.shape[2] + 4))
    assert_within(y, y_ref, cast_bound(y_ref, bound, out_dtype), f"{what} output")
    return y_ref


_COMPILE_SCRIPT = r"""
import importlib, json, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
out = []
for mod, name, sig, consts, cap in json.loads(sys.stdin.read()):
    fn = getattr(importlib.import_module(mod), name)
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", cap, 32))
    ptx = k.asm["ptx"]
    out.append({"cubin_bytes": len(k.asm["cubin"]), "mma": "mma.sync.aligned" in ptx or "wgmma" in ptx, "ptx": ptx})
print(json.dumps(out))
"""


def compile_for_cuda(specs: list) -> list[dict]:
    """Compile Triton kernels ahead of time for CUDA targets, without a GPU (Triton's own ptxas):
    what the interpreter lets through but the GPU compiler refuses (dot operand dtypes / shapes,
    bitcasts) fails here. ``specs``: ``(module, kernel name, signature, constexprs, capability)``
    (signature as ``triton.compiler.ASTSource`` takes it, e.g. ``{"a_ptr": "*bf16", "M": "i32"}``).
    Runs in a subprocess without ``TRITON_INTERPRET`` (the kernels must be decorated as GPU kernels).
    Returns per spec ``{"cubin_bytes", "mma" (a tensor-core mma instruction in the PTX), "ptx"}``."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT],
        input=json.dumps(specs),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
