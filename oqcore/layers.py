"""Layer kinds: which modules of a model oqcore can quantize, and how their weights are laid out.

- ``"linear"``: :class:`torch.nn.Linear`, weight ``[N, K]`` (out features, in features).
- ``"moe"``: transformers v5 fused routed experts: a module holding 3D ``gate_up_proj`` and
  ``down_proj`` parameters, either ``[E, 2I, H]`` / ``[E, H, I]`` (Mixtral, Qwen3-MoE, OLMoE: what
  vLLM calls ``w13`` / ``w2``) or transposed ``[E, H, 2I]`` / ``[E, I, H]`` with per-expert biases
  (GPT-OSS, whose gate and up columns are also interleaved rather than stacked).

A router (the ``gate`` / ``router`` linear that scores experts beside an ``experts`` module) is a
linear by type but stays in high precision unless a target names it, as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ROUTER_NAMES = ("gate", "router")


@dataclass(frozen=True)
class MoELayout:
    """Shapes and layout of a fused-experts module.

    ``num_experts`` E, ``hidden_size`` H, ``intermediate_size`` I; ``transposed`` for the GPT-OSS
    ``[E, H, 2I]`` / ``[E, I, H]`` storage; ``concatenated`` when gate and up are stacked
    (``[gate; up]``) rather than interleaved; ``has_bias`` when ``gate_up_proj_bias [E, 2I]`` and
    ``down_proj_bias [E, H]`` exist.
    """

    num_experts: int
    hidden_size: int
    intermediate_size: int
    transposed: bool
    concatenated: bool
    has_bias: bool

    @property
    def w13_shape(self) -> tuple[int, int, int]:
        """Storage shape of ``gate_up_proj``."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        return (e, h, 2 * i) if self.transposed else (e, 2 * i, h)

    @property
    def w2_shape(self) -> tuple[int, int, int]:
        """Storage shape of ``down_proj``."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        return (e, i, h) if self.transposed else (e, h, i)

    def __str__(self) -> str:
        t = ", transposed" if self.transposed else ""
        b = ", bias" if self.has_bias else ""
        return f"E={self.num_experts} H={self.hidden_size} I={self.intermediate_size}{t}{b}"


def moe_layout(module: nn.Module) -> MoELayout | None:
    """The :class:`MoELayout` of a fused-experts module, or ``None`` if ``module`` is not one.

    Uses transformers' own ``is_transposed`` / ``is_concatenated`` / ``has_bias`` attributes when
    the experts class sets them, and otherwise infers the layout from the shapes (unambiguous: the
    hidden size is the dim ``gate_up_proj`` and ``down_proj`` share).
    """
    gu = getattr(module, "gate_up_proj", None)
    dp = getattr(module, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(dp, torch.Tensor)) or gu.dim() != 3 or dp.dim() != 3:
        return None
    e = gu.shape[0]
    if dp.shape[0] != e:
        return None
    transposed = getattr(module, "is_transposed", None)
    if transposed is None:
        if gu.shape[2] == dp.shape[1] and gu.shape[1] == 2 * dp.shape[2]:
            transposed = False
        elif gu.shape[1] == dp.shape[2] and gu.shape[2] == 2 * dp.shape[1]:
            transposed = True
        else:
            return None
    h, two_i = (gu.shape[1], gu.shape[2]) if transposed else (gu.shape[2], gu.shape[1])
    if two_i % 2:
        return None
    has_bias = isinstance(getattr(module, "gate_up_proj_bias", None), torch.Tensor)
    concatenated = bool(getattr(module, "is_concatenated", True))
    return MoELayout(e, h, two_i // 2, bool(transposed), concatenated, has_bias)


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"moe"`` or ``None`` (not a quantizable layer)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if moe_layout(module) is not None:
        return "moe"
    return None


def layer_shape(module: nn.Module) -> str:
    """A short human description of a layer's weight shape, for plans and errors."""
    kind = layer_kind(module)
    if kind == "linear":
        return f"[{module.out_features}, {module.in_features}]"
    if kind == "moe":
        return str(moe_layout(module))
    return "-"


def is_router(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    """Whether a linear is an MoE router: named ``gate`` or ``router`` beside an ``experts`` module."""
    if not isinstance(module, nn.Linear) or parent is None:
        return False
    if name.rsplit(".", 1)[-1] not in ROUTER_NAMES:
        return False
    experts = getattr(parent, "experts", None)
    return isinstance(experts, nn.Module) and (moe_layout(experts) is not None or isinstance(experts, nn.ModuleList))
