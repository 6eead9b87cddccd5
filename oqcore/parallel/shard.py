"""What one rank holds of a layer: the index ranges of each tensor, and the amax collectives.

A rank's piece of a tensor is a :class:`Split`: along one dim, the concatenation of one index range
(a plain column / row shard, an expert range) or two (the gate and up halves of a fused ``[gate;
up]`` expert projection, each cut the same way). A sharded layer carries a :class:`LayerShard`
(attribute ``oq_shard``): its style, the :class:`Split` of each parameter in storage coordinates,
of each quantized weight in the canonical ``[..., N, K]`` coordinates the quantizers see, and the
size of the amax each weight's quantization reduces over the group (0: a status-only collective).

Plain local tensors with this metadata, not DTensors: a quantized weight is several tensors of
different layouts (fp8 codes, float32 or e8m0 scale grids, packed nibbles, a per-expert global
scale) that every backend kernel takes as plain tensors, and vLLM's engine (the main consumer of
sharded online quantization) holds local shards the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from oqcore.parallel.comm import Group


@dataclass(frozen=True)
class Split:
    """A rank's piece of a tensor along ``dim`` (storage coordinates, non-negative): the
    concatenation of index ``ranges`` ``[start, stop)`` of the ``full`` extent."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    full: int

    @property
    def local(self) -> int:
        """The piece's extent along ``dim``."""
        return sum(b - a for a, b in self.ranges)

    def local_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``shape`` with ``dim`` replaced by :attr:`local`."""
        return tuple(self.local if d == self.dim else s for d, s in enumerate(shape))

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the full tensor ``t`` (a view for one range, a copy for two)."""
        parts = [t.narrow(self.dim, a, b - a) for a, b in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)

    def transposed(self, ndim: int) -> Split:
        """The same piece of the tensor with its last two dims swapped (GPT-OSS's storage)."""
        d = {ndim - 1: ndim - 2, ndim - 2: ndim - 1}.get(self.dim, self.dim)
        return Split(d, self.ranges, self.full)


@dataclass
class LayerShard:
    """The sharding of one layer on one rank (see the module docstring).

    - ``style``: the parallel style (``colwise``, ``rowwise``, ``colwise_gather_output``,
      ``rowwise_split_input``, ``tp_experts``, ``ep_experts``).
    - ``params``: ``{parameter name: Split}`` in storage coordinates (the checkpoint's layout).
    - ``weights``: ``{weight prefix: Split}`` of each quantized weight in canonical coordinates
      (``weight`` ``[N, K]``; ``w13_weight`` ``[E, 2I, H]``, ``w2_weight`` ``[E, H, I]``).
    - ``rank0``: parameters only rank 0 holds (the bias of a row-split layer: the partial outputs
      are summed, so it is added once); the other ranks hold zeros.
    - ``amax_numel``: ``{weight prefix: elements of the amax grid reduced when quantizing it}``
      (0: only the status element travels).
    - ``expert_offset``: the first global expert id this rank owns (expert parallel).
    - ``full``: ``{parameter name: full shape}``, for export and reloads of full tensors.
    - ``weight_shapes``: ``{weight prefix: unsharded canonical shape}``.
    - ``attrs``: the module's unsharded shape attributes (``in_features`` / ``out_features``, or
      the experts' ``layout``), for an export of the whole model.
    """

    group: Group
    style: str
    params: dict[str, Split] = field(default_factory=dict)
    weights: dict[str, Split] = field(default_factory=dict)
    rank0: tuple[str, ...] = ()
    amax_numel: dict[str, int] = field(default_factory=dict)
    expert_offset: int = 0
    full: dict[str, tuple[int, ...]] = field(default_factory=dict)
    attrs: dict[str, object] = field(default_factory=dict)
    weight_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    hooks: list = field(default_factory=list, repr=False)

    def begin(self) -> None:
        """Start a quantization of the layer: every weight owes its one collective."""
        self.pending = list(self.amax_numel)

    def sync_amax(self, prefix: str, local: torch.Tensor | None, failed: bool, what: str) -> torch.Tensor | None:
        """The collective of weight ``prefix``: MAX all-reduce of this rank's amax grid ``local``
        (``None`` when the weight needs no reduction, or when this rank failed) with its status.
        Returns the reduced grid (``None`` when none is needed). Raises
        :class:`oqcore.DistributedError` on a healthy rank when another one failed."""
        if prefix in self.pending:
            self.pending.remove(prefix)
        n = self.amax_numel.get(prefix, 0)
        payload = torch.zeros(n) if local is None or failed else local
        out = self.group.all_reduce_max(payload, failed, what)
        return out if n else None

    def fail_pending(self, what: str) -> None:
        """Join the collectives this rank still owes after failing (status = failed), so the
        other ranks stop at the same point instead of waiting."""
        for prefix in list(self.pending):  # in the order the healthy ranks quantize them
            self.sync_amax(prefix, None, True, what)


def join_as_failed(layer: object, what: str) -> None:
    """A failed rank's stand-in for quantizing ``layer`` (a wrapper, or a reload's scratch copy of
    one): join every collective its weights owe, as failed, so the other ranks stop with it.
    Nothing for a layer held whole."""
    shard = getattr(layer, "oq_shard", None)
    if shard is not None:
        shard.begin()
        shard.fail_pending(what)
