"""The ``oq`` command: inspect plugins and keys, validate configs, explain plans.

Every command prints a clear ``error: ...`` line and exits with status 2 on an :class:`oqcore.OqError`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from oqcore.errors import OqError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="oqcore: online quantization of PyTorch models.")

DEFAULT_SCHEME = "fp8_per_block"

# Third-party import-time chatter (torchao's optional CUDA extensions, a torch deprecation notice)
# would bury the report on a CPU machine; it says nothing about the user's model.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def _load_config(config: str | None, overrides: list[str] | None):
    """A config from a YAML/JSON path or a shorthand name (default fp8_per_block), plus overrides."""
    from oqcore.config import QuantizationConfig

    overrides = list(overrides or [])
    if config is None:
        base: dict = {} if any(o.split("=", 1)[0].split(".")[0] in ("linear", "moe", "targets", "scheme") for o in overrides) else {"scheme": DEFAULT_SCHEME}
        return QuantizationConfig.from_dotlist(overrides, base=base)
    p = Path(config)
    if p.suffix in (".yaml", ".yml", ".json") or p.exists():
        return QuantizationConfig.from_yaml(p, overrides)
    return QuantizationConfig.from_dotlist(overrides, base={"scheme": config})


@app.command()
def keys(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the quantization key names the installed plugins registered."""
    import oqcore

    try:
        infos = oqcore.list_quant_keys()
        reg = oqcore.get_registry()
    except OqError as e:
        _fail(e)
    rows = [
        {
            "name": i.name,
            "weight": str(i.weight) if i.weight else None,
            "activation": str(i.activation) if i.activation else None,
            "aliases": list(i.aliases),
            "plugin": i.plugin,
            "description": i.description,
        }
        for i in infos
    ]
    shorthands = [
        {
            "name": s.name,
            "linear": dict(s.linear) if s.linear is not None else None,
            "moe": dict(s.moe) if s.moe is not None else None,
            "plugin": s.plugin,
        }
        for s in sorted(reg.shorthands.values(), key=lambda s: s.name)
    ]
    if as_json:
        typer.echo(json.dumps({"keys": rows, "shorthands": shorthands}, indent=2))
        return
    typer.echo(_table(["name", "as weight", "as activation", "plugin"], [[r["name"], r["weight"] or "-", r["activation"] or "-", r["plugin"]] for r in rows]))
    typer.echo("")
    typer.echo(_table(["shorthand", "linear", "moe", "plugin"], [[s["name"], _slot(s["linear"]), _slot(s["moe"]), s["plugin"]] for s in shorthands]))


def _slot(m: dict | None) -> str:
    if m is None:
        return "-"
    return ", ".join(f"{k}={'null' if v is None else v}" for k, v in m.items())


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@app.command()
def plugins(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the discovered plugins: distribution, version, status and any load error."""
    from oqcore.plugins import get_plugin_manager

    pm = get_plugin_manager()
    try:
        pm.registry  # noqa: B018 - loading registers failures too
    except OqError as e:
        _fail(e)
    records = sorted(pm.records.values(), key=lambda r: r.name)
    if as_json:
        typer.echo(json.dumps([r.__dict__ for r in records], indent=2))
        return
    typer.echo(
        _table(
            ["plugin", "distribution", "version", "status", "error"],
            [[r.name, r.distribution, r.version, r.status, r.error or ""] for r in records],
        )
    )


@app.command()
def validate(
    config: Annotated[str, typer.Argument(help="YAML/JSON config file, or a shorthand name such as fp8_per_block.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides: moe.activation=mxfp8 ...")] = None,
) -> None:
    """Validate a config (with overrides) and print it resolved, key names and all."""
    try:
        cfg = _load_config(config, overrides)
    except OqError as e:
        _fail(e)
    from omegaconf import OmegaConf

    typer.echo(OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict())).rstrip() or "{}  # nothing is quantized")
    typer.echo("valid")


@app.command()
def explain(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides: moe.activation=mxfp8 ...")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Hugging Face model folder (config.json). Default: the bundled all-MiniLM-L6-v2.")] = None,
    config: Annotated[Optional[str], typer.Option(help=f"YAML/JSON config or shorthand. Default: {DEFAULT_SCHEME}.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Device the layers will run on (decides backends). Default: cuda if available, else cpu.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show every rejected backend and why.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Show, per layer, what the config does: scheme, backend, and why (no weights are read)."""
    import oqcore
    from oqcore.loading import build_meta_model, bundled_model_dir

    try:
        cfg = _load_config(config, overrides)
        path = model if model is not None else bundled_model_dir()
        meta = build_meta_model(path)
        p = oqcore.plan(meta, cfg, device=device)
    except OqError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps({"model": str(path), "device": str(p.device), "layers": p.rows(), "summary": p.summary()}, indent=2))
        return
    typer.echo(f"model: {path} ({type(meta).__name__}), device: {p.device}")
    typer.echo(p.explain(verbose=verbose))


@app.command()
def quantize(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides: linear.activation=null moe=mxfp8 ...")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Hugging Face model folder (config.json + safetensors). Default: the bundled all-MiniLM-L6-v2.")] = None,
    config: Annotated[Optional[str], typer.Option(help=f"YAML/JSON config or shorthand. Default: {DEFAULT_SCHEME}.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Save the quantized model to this folder (oqcore.load reads it back).")] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the figures to this JSON file.")] = None,
    device: Annotated[str, typer.Option(help="Device to load onto.")] = "cpu",
    check: Annotated[bool, typer.Option(help="Compare against the bf16 model on bundled text (loads it too).")] = True,
) -> None:
    """Load a model, quantizing it while loading, and report sizes, time, memory and fidelity."""
    import torch
    from tqdm import tqdm

    import oqcore
    from oqcore.loading import bundled_model_dir

    try:
        cfg = _load_config(config, overrides)
        path = model if model is not None else bundled_model_dir()
        typer.echo(f"model: {path}")
        typer.echo(f"config: {json.dumps(cfg.to_dict())}")
        bars: list = []  # created on the first call, when reading starts and the total is known

        def progress(done: int, total: int) -> None:
            """Advance the bar to ``done`` of ``total`` bytes read."""
            if not bars:
                bars.append(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading"))
            bars[0].update(done - bars[0].n)

        try:
            qmodel = oqcore.load(path, cfg, device=device, progress=progress)
        finally:
            for b in bars:
                b.close()
        rep = oqcore.report(qmodel)
        typer.echo(str(rep))
        result = {"model": str(path), "config": cfg.to_dict(), "report": rep.to_dict()}
        if check:
            from oqcore.fidelity import compare, reference_model

            fid = compare(qmodel, reference_model(path, torch.bfloat16, device), path)
            typer.echo(f"fidelity: {fid}")
            result["fidelity"] = fid.to_dict()
        if out is not None:
            oqcore.save_quantized(qmodel, out)
            typer.echo(f"saved: {out} (oqcore.load reads it back without re-quantizing)")
            result["out"] = str(out)
    except OqError as e:
        _fail(e)
    if json_file is not None:
        json_file.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"figures written to {json_file}")


@app.command("make-model")
def make_model(
    arch: Annotated[str, typer.Argument(help="mixtral, qwen3_moe, olmoe or gpt_oss.")],
    out: Annotated[Path, typer.Argument(help="Folder to write (config.json + model.safetensors).")],
    hidden_size: Annotated[int, typer.Option(help="Hidden size H.")] = 160,
    intermediate_size: Annotated[int, typer.Option(help="Expert intermediate size I.")] = 96,
    layers: Annotated[int, typer.Option(help="Decoder layers.")] = 2,
    experts: Annotated[Optional[int], typer.Option(help="Experts per layer (default 4).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the init.")] = 0,
) -> None:
    """Write a tiny random MoE causal LM in the architecture's real on-disk layout (for trying oq quantize)."""
    from oqcore.synthetic import make_tiny_moe

    try:
        make_tiny_moe(arch, out, hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=layers,
                      num_experts=experts, seed=seed)
    except ValueError as e:
        _fail(e)
    typer.echo(f"wrote {out}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Run the benchmark suite (bench/ of a source checkout); arguments go to `python -m bench` (--quick, --out DIR)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "__main__.py").is_file():
        _fail(OqError(f"oq bench runs the bench/ folder of a source checkout; none beside {root / 'oqcore'}"))
    sys.path.insert(0, str(root))
    import bench as suite

    raise typer.Exit(suite.main(list(ctx.args)) or 0)


def main() -> None:
    """Entry point of the ``oq`` console script."""
    try:
        app()
    except OqError as e:  # anything a command did not catch itself
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
