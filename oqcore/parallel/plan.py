"""The parallel plan: which layer is split how across the ranks.

By default transformers' own plan for the architecture (``model.tp_plan`` for ``"tp"``; for
``"ep"`` the same with the experts entries replaced by ``model.ep_plan``), or a dict with the same
syntax (``{"model.layers.*.self_attn.q_proj": "colwise", ...}``: ``*`` stands for a layer index).
transformers' style names are kept; what each means here:

=========================  ===================================================================
style                      this rank holds / forward
=========================  ===================================================================
colwise                    rows ``[r*N/w, (r+1)*N/w)`` of ``W [N, K]`` (and of the bias); output
                           stays split (the next row-split layer consumes it)
colwise_gather_output      the same; the output is all-gathered (OLMoE's q/k/v before its norms)
rowwise                    columns ``[r*K/w, ...)`` of ``W``; input arrives split, the partial
                           outputs are summed (all-reduce); the bias is added once (rank 0)
rowwise_split_input        the same, the full input is cut first (OLMoE's o_proj)
moe_tp_experts             every expert, its intermediate size cut: gate and up rows of
                           ``gate_up_proj`` (each half cut alike), ``down_proj`` columns; sum
ep_dispatch_experts        experts ``[r*E/w, (r+1)*E/w)`` whole; other ranks' expert ids skipped;
                           sum
=========================  ===================================================================

Every other style (``embedding_rowwise``, ``replicated_with_grad_allreduce``, ``packed_colwise``
and ``grouped_gemm`` on expert parameters, whose module entry decides) keeps the module whole on
every rank, as does a module the plan does not name. Only linears and *quantized* fused experts are
split; an experts module left in high precision stays whole.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from oqcore.errors import ConfigError

LINEAR_STYLES = {
    "colwise": "colwise",
    "local_colwise": "colwise",
    "colwise_gather_output": "colwise_gather_output",
    "colwise_rep": "colwise_gather_output",
    "rowwise": "rowwise",
    "local_rowwise": "rowwise",
    "rowwise_split_input": "rowwise_split_input",
}
"""transformers' linear styles -> the behaviour here (``local_*`` are the same split without DTensors)."""

EXPERT_STYLES = {"moe_tp_experts": "tp_experts", "ep_dispatch_experts": "ep_experts"}
"""transformers' experts-module styles -> tensor parallel inside experts / expert parallel."""

REPLICATED_STYLES = frozenset(
    {
        "replicate",
        "replicated_with_grad_allreduce",
        "embedding_rowwise",
        "packed_colwise",
        "packed_rowwise",
        "local_packed_rowwise",
        "grouped_gemm",
        "sequence_parallel",
        "gather",
        "isolated",
        "local",
        "ep_router",
    }
)
"""Styles that keep the module whole here (parameter-level expert entries: the module entry decides)."""

MODES = ("tp", "ep")


def _known() -> str:
    return ", ".join(sorted({*LINEAR_STYLES, *EXPERT_STYLES}))


def plan_entries(model: nn.Module, parallel: Any) -> dict[str, str]:
    """The plan as ``{pattern: transformers style}``: ``"tp"``, ``"ep"`` or a user dict (checked).

    Raises :class:`oqcore.ConfigError` (field ``parallel``) for an unknown mode, a non-dict, a
    non-string pattern or an unknown style (listing the valid ones)."""
    if isinstance(parallel, str):
        if parallel not in MODES:
            raise ConfigError(f"unknown parallel mode {parallel!r}; expected 'tp', 'ep' or a dict {{module pattern: style}}", "parallel")
        tp = dict(getattr(model, "tp_plan", None) or {})
        if parallel == "tp":
            return tp
        ep = dict(getattr(model, "ep_plan", None) or {})
        experts = {k.removesuffix(".experts") for k in ep if k.endswith(".experts")}
        keep = {k: v for k, v in tp.items() if not any(k.startswith(e + ".experts") for e in experts)}
        return {**keep, **ep}
    if not isinstance(parallel, Mapping):
        raise ConfigError(
            f"expected 'tp', 'ep' or a dict {{module pattern: style}}, got {type(parallel).__name__}", "parallel"
        )
    for k, v in parallel.items():
        if not isinstance(k, str) or not k:
            raise ConfigError(f"plan keys are module names or patterns ('model.layers.*.mlp.down_proj'), got {k!r}", "parallel")
        if not isinstance(v, str) or not (v in LINEAR_STYLES or v in EXPERT_STYLES or v in REPLICATED_STYLES):
            raise ConfigError(f"unknown parallel style {v!r} for {k!r}; expected one of {_known()} or 'replicate'", f"parallel[{k!r}]")
    return dict(parallel)


def _generic(name: str) -> str:
    """``model.layers.12.mlp`` -> ``model.layers.*.mlp`` (transformers' plan lookup)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", name)


def module_styles(model: nn.Module, entries: Mapping[str, str]) -> dict[str, str]:
    """``{module name: style}`` (:data:`LINEAR_STYLES` / :data:`EXPERT_STYLES` values) of every
    module the plan splits: linears (quantized or not) with a linear style, quantized fused
    experts with an experts style. Tied modules (an ``lm_head`` sharing the embedding) stay whole."""
    from oqcore.modules import QuantizedLinear, QuantizedMoE

    tied = {k.rpartition(".")[0] for k in (getattr(model, "all_tied_weights_keys", None) or {})}
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        style = entries.get(name, entries.get(_generic(name)))
        if style is None or name in tied:
            continue
        if style in LINEAR_STYLES and isinstance(module, (nn.Linear, QuantizedLinear)):
            out[name] = LINEAR_STYLES[style]
        elif style in EXPERT_STYLES and isinstance(module, QuantizedMoE):
            out[name] = EXPERT_STYLES[style]
    return out
