"""One gloo rank of the parallel tests: ``python parallel_worker.py JOB.json RANK``.

The job (written by :func:`parallel_util.run_ranks`) holds the world size, the file store and a
list of cases; for each case this rank runs ``oqcore.load(..., parallel=...)`` (and, as the case
asks, a forward, a reload, an export) and saves what the test compares to
``<out>/<case id>.rank<r>.pt``: the quantized layers' local tensors, each sharded layer's cuts,
the logits, the load figures, or the error's type and message.
"""

from __future__ import annotations

import json
import sys
import traceback

import torch
import torch.distributed as dist


def _cuts(model) -> dict:
    """``{module: {"style", "weights": {prefix: (dim, ranges, full)}, "params": {...}}}``."""
    out = {}
    for name, shard in model.oq_state.shards.items():
        out[name] = {
            "style": shard.style,
            "weights": {p: (s.dim, s.ranges, s.full) for p, s in shard.weights.items()},
            "params": {p: (s.dim, s.ranges, s.full) for p, s in shard.params.items()},
        }
    return out


def _tensors(model) -> dict:
    return {f"{n}.{k}": t.detach().clone() for n, w in model.oq_state.wrappers.items() for k, t in w.named_parameters(recurse=False)}


def run_case(case: dict, rank: int) -> dict:
    import oqcore

    dtype = getattr(torch, case.get("dtype", "float32"))
    kw = {"parallel": case.get("parallel", "tp")}
    if "mesh" in case:
        kw["mesh"] = _mesh(case["mesh"])
    try:
        model = oqcore.load(case["path"], case["config"], dtype=dtype, **kw)
    except Exception as e:  # the test asserts the type and message
        return {"error": (type(e).__name__, str(e))}
    res = {"error": None, "cuts": _cuts(model), "tensors": _tensors(model)}
    s = model.oq_state.stats
    res["stats"] = {"peak_added": s.peak_added, "model": s.model_bytes, "largest": s.largest_layer_bytes, "read": s.bytes_read,
                    "quantized": s.quantized_bytes, "seconds": s.seconds_total}
    if case.get("forward", True):
        ids = torch.tensor([[3, 17, 42, 99, 5, 7, 11, 64]])
        with torch.no_grad():
            res["logits"] = model(ids).logits
    for step in case.get("after", []):
        res[step["name"]] = _after(model, step, rank)
    return res


def _mesh(kind: str):
    """A mesh argument of the kind a case names: a 1-D or 2-D DeviceMesh, the default group, or junk."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if kind == "mesh1d":
        return init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    if kind == "mesh2d":
        return init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    if kind == "group":
        return dist.group.WORLD
    return kind  # a string: not a mesh


def _after(model, step: dict, rank: int):
    """A follow-up on the loaded model: ``reload`` (full or pre-sharded tensors) or ``export``."""
    import oqcore

    if step["kind"] == "reload":
        before = {k: t.data_ptr() for k, t in _tensors_live(model).items()}
        weights = _weights(model, step)
        try:
            oqcore.reload_weights(model, weights)
        except Exception as e:
            return {"error": (type(e).__name__, str(e)), "tensors": _tensors(model)}
        after = {k: t.data_ptr() for k, t in _tensors_live(model).items()}
        return {"error": None, "in_place": before == after, "tensors": _tensors(model)}
    if step["kind"] == "export":
        try:
            dest = oqcore.save_quantized(model, step["out"])
        except Exception as e:
            return {"error": (type(e).__name__, str(e))}
        return {"error": None, "dest": str(dest)}
    raise ValueError(step["kind"])


def _weights(model, step: dict) -> dict:
    """The checkpoint ``step["source"]`` as full tensors, or cut to this rank's pieces (``form:
    pieces``, the load's own cuts: what a trainer holding shards would pass), with a NaN planted
    at ``step["nan"]`` (a checkpoint key, element 0)."""
    from oqcore.loading.checkpoint import iter_checkpoint

    weights = dict(iter_checkpoint(step["source"]))
    state = model.oq_state
    if step.get("form") == "pieces":
        for k, cut in state.source_cuts.items():
            weights[k] = torch.cat([weights[k].narrow(cut.dim, a, b - a) for a, b in cut.ranges], dim=cut.dim)
        for k in state.foreign_sources:
            del weights[k]
    if step.get("nan"):
        weights[step["nan"]] = weights[step["nan"]].clone()
        weights[step["nan"]].view(-1)[0] = float("nan")
    return weights


def _tensors_live(model) -> dict:
    return {f"{n}.{k}": t for n, w in model.oq_state.wrappers.items() for k, t in w.named_parameters(recurse=False)}


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    rank = int(sys.argv[2])
    dist.init_process_group("gloo", init_method=f"file://{job['store']}", rank=rank, world_size=job["world"])
    try:
        for case in job["cases"]:
            try:
                res = run_case(case, rank)
            except Exception:
                res = {"error": ("crash", traceback.format_exc())}
            torch.save(res, f"{job['out']}/{case['id']}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
