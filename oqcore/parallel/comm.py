"""The process group a parallel load runs on, and the few collectives it needs.

torch.distributed carries everything (gloo on the CPU, NCCL on CUDA): a 1-D
:class:`torch.distributed.device_mesh.DeviceMesh` or a ``ProcessGroup`` names the ranks that share
the model; ``None`` means the default group. Every collective of a load carries a *status* element
so that a rank that failed keeps the others from waiting forever: each collective is a MAX
all-reduce of ``[status, payload...]`` where ``status`` is ``0`` on a healthy rank and ``rank + 1``
on a failed one; after it every rank knows whether (and which) rank failed, at the same point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from oqcore.errors import ConfigError, DistributedError


@dataclass(frozen=True)
class Group:
    """The ranks sharing one model: torch.distributed ``pg`` (``None`` = the default group),
    this process's ``rank`` in it and the ``world`` size."""

    pg: Any
    rank: int
    world: int

    @property
    def device(self) -> torch.device:
        """Where collective buffers live: CUDA for NCCL, else the CPU (gloo)."""
        import torch.distributed as dist

        backend = str(dist.get_backend(self.pg)).lower()
        return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")

    def all_reduce_max(self, payload: torch.Tensor, failed: bool, what: str) -> torch.Tensor:
        """MAX all-reduce of float32 ``payload`` (any shape) with this rank's status; returns the
        reduced payload (same shape, on ``payload``'s device). Raises
        :class:`oqcore.DistributedError` naming the failed rank and ``what`` on every healthy rank
        when some rank reported a failure (the failed rank's caller raises its own error)."""
        import torch.distributed as dist

        flat = torch.empty(1 + payload.numel(), dtype=torch.float32, device=self.device)
        flat[0] = float(self.rank + 1) if failed else 0.0
        flat[1:] = payload.detach().reshape(-1).to(flat.device, torch.float32)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.pg)
        bad = int(flat[0].item())
        if bad and not failed:
            raise DistributedError(
                f"rank {bad - 1} of {self.world} failed while {what} (its own error says why); this rank "
                "stops at the same point, so no rank keeps a half-applied result"
            )
        return flat[1:].reshape(payload.shape).to(payload.device)

    def check(self, failed: bool, what: str) -> None:
        """A status-only collective (see :meth:`all_reduce_max`)."""
        self.all_reduce_max(torch.zeros(0), failed, what)

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``t`` (same shape on all ranks) concatenated along ``dim`` in rank order."""
        import torch.distributed as dist

        src = t.contiguous()
        parts = [torch.empty_like(src) for _ in range(self.world)]
        dist.all_gather(parts, src, group=self.pg)
        return torch.cat(parts, dim=dim)

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place SUM all-reduce of ``t`` (the partial outputs of row-split layers)."""
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.pg)
        return t


def resolve_group(mesh: Any) -> Group:
    """The :class:`Group` for ``mesh``: a 1-D ``DeviceMesh``, a ``ProcessGroup`` or ``None`` (the
    default group). Raises :class:`oqcore.ConfigError` (field ``mesh``) when torch.distributed is not
    initialized (``torchrun`` and ``torch.distributed.init_process_group`` do it), for a mesh of
    more than one dimension, or for any other object."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            "a parallel load needs torch.distributed initialized (run under torchrun, or call "
            "torch.distributed.init_process_group('gloo' on the CPU, 'nccl' on GPUs) first)",
            "mesh",
        )
    pg = None
    if mesh is not None:
        from torch.distributed.device_mesh import DeviceMesh

        if isinstance(mesh, DeviceMesh):
            if mesh.ndim != 1:
                raise ConfigError(
                    f"expected a 1-D DeviceMesh (the ranks sharing each layer), got {mesh.ndim} dims "
                    f"{tuple(mesh.shape)}; pass mesh[<dim name>] for the tensor-parallel dimension",
                    "mesh",
                )
            pg = mesh.get_group()
        elif isinstance(mesh, dist.ProcessGroup):
            pg = mesh
        else:
            raise ConfigError(
                f"expected a torch.distributed DeviceMesh, a ProcessGroup or None, got {type(mesh).__name__}", "mesh"
            )
    return Group(pg, dist.get_rank(pg), dist.get_world_size(pg))
