"""Helpers shared by the fp8 plugin tests (imported by name: the test folder has no __init__.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two fp8 tensors (``torch.equal`` on their uint8 views; -0 != +0)."""
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def ct_quantize(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' fp8 (``calculate_qparams`` + ``quantize``) for a float32 ``w [N, K]``.

    ``strategy``: ``"tensor"``, ``"channel"``, ``"block"`` (128x128), ``"token"`` or ``"group"``
    (1x128; needs K % 128 == 0, compressed-tensors' own limit). The min/max an observer would feed
    ``calculate_qparams`` are taken per group here (block edges zero padded, as
    compressed-tensors pads blocks).
    """
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    w = w.float()
    kw = {}
    if strategy == "block":
        kw["block_structure"] = [128, 128]
    if strategy == "group":
        kw["group_size"] = 128
    if strategy == "token":
        kw["dynamic"] = True
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, **kw)
    if strategy == "tensor":
        mn, mx = torch.aminmax(w)
    elif strategy in ("channel", "token"):
        mn, mx = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    elif strategy == "group":
        g = w.unflatten(-1, (w.shape[1] // 128, 128))
        mn, mx = g.amin(dim=-1), g.amax(dim=-1)
    else:
        n, k = w.shape
        nb, kb = -(-n // 128), -(-k // 128)
        p = F.pad(w, (0, kb * 128 - k, 0, nb * 128 - n)).reshape(nb, 128, kb, 128)
        mn, mx = p.amin(dim=(1, 3)), p.amax(dim=(1, 3))
    scale, zp = calculate_qparams(mn, mx, args)
    q = quantize(w, scale, zp, args, dtype=FP8)
    return q, scale


def cases() -> dict[str, torch.Tensor]:
    """Named float32 test matrices: random, zero, tiny (subnormal range), huge, mixed magnitudes,
    shapes that are and are not multiples of 128."""
    g = torch.Generator().manual_seed(1234)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    mixed = r(200, 300) * torch.logspace(-20, 20, 300)[None, :]
    mixed[::7] *= 1e-6
    rows = r(130, 257)
    rows[5] = 0.0
    rows[:, 128:] = 0.0  # a zero 128-wide edge block column
    neg_zero = -torch.zeros(64, 64)
    neg_zero[0, :3] = torch.tensor([1.0, -0.0, -1e-9])
    return {
        "random_256x256": r(256, 256),
        "random_200x300": r(200, 300),
        "zeros_100x70": torch.zeros(100, 70),
        "tiny_1e-40": r(150, 129) * 1e-40,
        "tiny_1e-6": r(64, 200) * 1e-6,
        "underflow_1e-44": r(17, 33).sign() * 1e-44,
        "huge_1e30": r(129, 131) * 1e30,
        "mixed": mixed,
        "zero_row_and_block": rows,
        "neg_zero": neg_zero,
        "single_1x1": torch.tensor([[3.0]]),
    }


def gaussian(*shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    """Seeded standard normal tensor."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def build_linear(w, bias, spec, backend=None, name="model.layers.0.q_proj"):
    """A processed :class:`oqcore.modules.QuantizedLinear` for weight ``w [N, K]`` planned through
    the public API with ``{"linear": spec}`` (``backend`` pins one). Returns ``(layer, layer_plan)``."""
    import oqcore
    from oqcore.modules import QuantizedLinear

    n, k = w.shape
    model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=bias is not None))
    cfg = {"linear": spec}
    if backend is not None:
        cfg["backend"] = {"linear": backend}
    lp = oqcore.plan(model, cfg, device="cpu")["0"]
    method = lp.bound.make_method(lp.backend)
    layer = QuantizedLinear(name, k, n, bias is not None, method, w.dtype)
    layer.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    method.process_weights_after_loading(layer)
    return layer, lp
