"""The ``oq`` command: inspect plugins and keys, validate configs, explain plans, quantize models.

Errors are for people. Whatever goes wrong, ``oq`` prints one ``error: <message>`` line per error
on stderr (a config with several invalid fields prints one line per field) and exits with

- 2 for a usage or config error: an :class:`oqcore.ConfigError` (and its subclasses) or a
  command-line usage error (a missing argument, an unknown option, a bad option value);
- 1 for every other error: :class:`oqcore.CheckpointError`, :class:`oqcore.SaveError`,
  :class:`oqcore.UnsupportedLayerError`, :class:`oqcore.NoBackendError`, :class:`oqcore.PluginError`,
  :class:`oqcore.InternalError`, and any unexpected exception, shown as
  ``error: internal error: <Type>: <message> (rerun with --debug for the traceback)``;
- 130 on Ctrl-C (``error: interrupted``).

The Python traceback is printed only with ``oq --debug ...`` or ``OQ_DEBUG=1``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from oqcore.errors import CheckpointError, ConfigError, InternalError, OqError, SaveError, UnknownKeyError
from oqcore.saved_format import DEFAULT_FORMAT, EXPORT_FORMATS

DEFAULT_SCHEME = "fp8_per_block"

# Third-party import-time chatter (torchao's optional CUDA extensions, a torch deprecation notice)
# would bury the report on a CPU machine; it says nothing about the user's model. Quieted only
# while a command runs (see _quiet_noisy_loggers): importing this module changes no logger.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet_noisy_loggers() -> Iterator[None]:
    """Raise :data:`NOISY_LOGGERS` to at least ``ERROR`` for the duration of a command, then put
    back the levels they had: a command run from Python (``main([...])``) leaves logging as it
    found it, even when it raises. (A logger created here keeps level ``NOTSET``, as if it had never
    been asked for.)"""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, NOISY_LOGGERS)]
    for lg, level in saved:
        lg.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


# ---- error presentation ---------------------------------------------------------------------------

# typer >= 0.22 vendors click as ``typer._click``; older typer uses click itself. Take the exception
# classes from the ones typer exports so both work.
_USAGE_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CLICK_EXCEPTION: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_DEBUG_HINT = " (rerun with --debug for the traceback)"


def _one_line(text: str) -> str:
    """``text`` on one line: its lines joined by ``"; "`` (by a space after a line ending in ``:``)."""
    out = ""
    for part in (p.strip() for p in str(text).splitlines()):
        if part:
            out += ("" if not out else " " if out.endswith(":") else "; ") + part
    return out


def _pair_text(item: Any) -> str:
    if isinstance(item, tuple) and len(item) == 2:
        field, message = item
        return f"{field}: {message}" if field else str(message)
    return str(item)


def error_lines(e: BaseException, debug: bool = False) -> list[str]:
    """The ``error: ...`` lines ``oq`` prints for ``e``: one per error.

    A :class:`oqcore.ConfigError` listing several problems (its ``errors``, ``(field, message)``
    pairs) gives one line each; any other :class:`oqcore.OqError` one line (a multi-line message is
    joined with ``"; "``); a usage error its message with a pointer to the command's ``--help``;
    an :class:`oqcore.InternalError` or an unexpected exception (``error: internal error: <Type>:
    <message>``) a hint to rerun with ``--debug`` (left out when ``debug`` is on, since the
    traceback is then printed).
    """
    hint = "" if debug else _DEBUG_HINT
    if isinstance(e, InternalError):
        return [f"error: {_one_line(str(e))}{hint}"]
    if isinstance(e, OqError):
        subs = getattr(e, "errors", None)
        if isinstance(subs, (list, tuple)) and len(subs) > 1:
            # ConfigError.errors: (field, message) pairs, one per problem found
            msgs = [_one_line(_pair_text(s)) for s in subs]
        else:
            msgs = [_one_line(str(e)) or type(e).__name__]
        return [f"error: {m}" for m in msgs]
    if isinstance(e, _USAGE_ERROR):
        ctx = getattr(e, "ctx", None)
        msg = _one_line(e.format_message())
        if ctx is not None:
            msg += f"{'' if msg.endswith(('.', '?', '!')) else '.'} Try '{ctx.command_path} --help'."
        return [f"error: {msg}"]
    if isinstance(e, _CLICK_EXCEPTION):
        return [f"error: {_one_line(e.format_message())}"]
    if isinstance(e, KeyboardInterrupt):
        return ["error: interrupted"]
    msg = _one_line(str(e))
    return [f"error: internal error: {type(e).__name__}{': ' + msg if msg else ''}{hint}"]


def exit_code(e: BaseException) -> int:
    """The exit status for ``e``: 2 for a usage/config error, 130 for Ctrl-C, 1 otherwise."""
    if isinstance(e, (ConfigError, _USAGE_ERROR)):
        return EXIT_USAGE
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_ERROR


def _env_debug() -> bool:
    return os.environ.get("OQ_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``warning: <message>`` line (the source location only matters with --debug)."""
    typer.echo(f"warning: {_one_line(str(message))}", err=True)


class OqGroup(TyperGroup):
    """The ``oq`` group: runs a command and turns whatever it raises into ``error:`` lines and an
    exit status (see the module docstring). Used by the console script and by ``CliRunner`` alike,
    since both call :meth:`main`."""

    def main(  # type: ignore[override]
        self, args=None, prog_name=None, complete_var=None, standalone_mode=True, windows_expand_args=True, **extra: Any
    ):
        """Run the command line ``args`` (default ``sys.argv[1:]``) and exit with its status.

        With ``standalone_mode=False`` exceptions propagate unchanged (for embedding).
        """
        if not standalone_mode:
            with _quiet_noisy_loggers():
                return super().main(args, prog_name, complete_var, standalone_mode=False, windows_expand_args=windows_expand_args, **extra)
        sys.exit(self.run(sys.argv[1:] if args is None else list(args), **extra))

    def run(self, args: list[str], **extra: Any) -> int:
        """Run the command line ``args`` and return its exit status (printing ``error:`` lines for
        whatever it raised). Every process-wide setting the run changes (the warning printer, the
        levels of :data:`NOISY_LOGGERS`) is put back before it returns."""
        with _quiet_noisy_loggers():
            return self._run(args, extra)

    def _run(self, args: list[str], extra: dict) -> int:
        ctx = None
        show = warnings.showwarning
        try:
            if not _env_debug():
                warnings.showwarning = _show_warning
            with self.make_context("oq", args, **extra) as ctx:
                if ctx.params.get("debug"):
                    warnings.showwarning = show
                self.invoke(ctx)
            return 0
        except typer.Exit as e:  # --help, or a command that ends early on purpose
            return e.exit_code
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            return EXIT_ERROR
        except BrokenPipeError:  # `oq keys | head`: the reader left; nothing more to say
            try:
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
            except OSError:
                pass
            return EXIT_ERROR
        except BaseException as e:  # noqa: BLE001 - the one place every error becomes a message
            if isinstance(e, SystemExit):
                raise
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `oq`: the help, as click shows it
                typer.echo(e.format_message(), err=True)
                return EXIT_USAGE
            debug = _env_debug() or bool(ctx is not None and ctx.params.get("debug"))
            if debug and not isinstance(e, _CLICK_EXCEPTION):
                traceback.print_exception(e, file=sys.stderr)
            for line in error_lines(e, debug):
                typer.echo(line, err=True)
            return exit_code(e)
        finally:
            warnings.showwarning = show


app = typer.Typer(
    cls=OqGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich markup would eat [brackets] in the texts (ignore=[lm_head])
    help="oqcore: online quantization of PyTorch models.",
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="On an error, also print the Python traceback (or set OQ_DEBUG=1).")] = False,
) -> None:
    """oqcore: online quantization of PyTorch models."""


# ---- shared option handling --------------------------------------------------------------------

OverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="[CONFIG] [KEY=VALUE]",
        help="Optional config (shorthand, key name or YAML/JSON file; same as --config), then dotted overrides: "
        "linear.activation=null moe=mxfp8 ignore=[lm_head] ...",
    ),
]
ConfigOpt = Annotated[
    Optional[str],
    typer.Option("--config", "-c", help=f"Shorthand (fp8_per_block), key name (mxfp8) or YAML/JSON file. Default: {DEFAULT_SCHEME}."),
]
InterpolateOpt = Annotated[
    bool, typer.Option("--interpolate", help="Resolve OmegaConf interpolations such as ${oc.env:VAR} in the config (off by default).")
]


def _split_args(config: str | None, args: list[str] | None) -> tuple[str | None, list[str]]:
    """``--config`` and the overrides from the positional arguments: a first positional without
    ``=`` is the config (``oq quantize mxfp8 moe.activation=null``)."""
    args = list(args or [])
    if args and "=" not in args[0]:
        if config is not None:
            raise ConfigError(
                f"the config is given twice: --config {config!r} and the argument {args[0]!r} "
                "(arguments after the config must be overrides of the form key=value)",
                "--config",
            )
        config, args = args[0], args[1:]
    return config, args


def build_config(config: str | None, overrides: list[str], interpolate: bool = False, base: Any = DEFAULT_SCHEME):
    """The :class:`oqcore.QuantizationConfig` of ``config`` (a shorthand, key name or file; ``base``,
    the default scheme, when ``None``) with the dotted ``overrides`` applied on top.

    Raises :class:`oqcore.ConfigError` naming the field, override or file at fault.
    """
    from oqcore.config import QuantizationConfig

    kw = {"interpolate": True} if interpolate else {}
    return QuantizationConfig.from_any(config if config is not None else base, list(overrides), **kw)


def saved_config(path: Path):
    """The config a folder written by :func:`oqcore.save_quantized` was quantized with (or the one a
    compressed-tensors, FineGrainedFP8 or ModelOpt FP8 checkpoint reads as), or ``None`` for a high-precision checkpoint (or a folder
    whose config.json cannot be read: the model build reports that with the file named).

    Raises :class:`oqcore.CheckpointError` naming config.json when the folder is already quantized
    by another tool, or its saved oqcore config is unreadable.
    """
    from oqcore.loading.saved import saved_config as read_saved_config
    from oqcore.saved_format import QUANT_METHOD
    from oqcore.loading.meta import read_model_config

    try:
        raw = read_model_config(path)
    except CheckpointError:
        return None
    from oqcore.loading.compressed import stored_config
    from oqcore.loading.ct_config import declares_compressed_tensors
    from oqcore.loading.peer_configs import declares_peer_format

    if declares_compressed_tensors(raw) or declares_peer_format(path, raw):
        return stored_config(path)  # read as stored, like an oqcore export
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if qc is None:
        return None
    if isinstance(qc, dict) and qc.get("quant_method") != QUANT_METHOD:
        from oqcore.loading.checks import READ_FORMATS

        raise CheckpointError(
            f"{path / 'config.json'}: the checkpoint is already quantized (quant_method={qc.get('quant_method', 'unknown')!r}); "
            f"oq quantizes bf16/fp16/fp32 checkpoints and reads {READ_FORMATS}. "
            "Load it with its own quantization method instead."
        )
    return read_saved_config(raw, path / "config.json")


def _config_origin(saved: bool, user) -> str:
    """How the printed config came about, for ``config:`` lines."""
    if not saved:
        return ""
    return " (saved with the model)" if user is None else " (the checkpoint's, overlaid with --config/overrides)"


def resolve_config(path: Path, config: str | None, overrides: list[str], interpolate: bool, device=None):
    """``(config, saved, user)`` for model folder ``path``. A high-precision folder: ``config`` +
    ``overrides`` on the default scheme, ``saved`` False, ``user`` that same config. A folder
    holding quantized weights (an oqcore export, a compressed-tensors / FineGrainedFP8 / ModelOpt
    checkpoint): its stored config, or, with ``--config``/overrides (applied on nothing, e.g.
    ``moe.activation=mxfp8``), the stored config overlaid with them by vLLM's rules
    (:mod:`oqcore.loading.overlay`); ``saved`` True; ``user`` what to pass to :func:`oqcore.load`
    (``None``: as stored)."""
    saved = saved_config(path)
    if saved is None:
        cfg = build_config(config, overrides, interpolate)
        return cfg, False, cfg
    if config is None and not overrides:
        return saved, True, None
    from oqcore.loading import build_meta_model
    from oqcore.loading.overlay import overlay, stored_specs

    user = build_config(config, overrides, interpolate, base=None)
    meta = build_meta_model(path)
    dev = device if device is not None else "cpu"
    try:
        ov = overlay(meta, saved, stored_specs(meta, saved, dev), user, dev, str(path))
    except ConfigError as e:  # named as the option it came from, the checkpoint's state first
        raise ConfigError(f"{path} is already quantized, and --config/overrides do not fit it: {e}", "--config") from None
    return ov.config, True, user


def _check_destination(path: Path | None, option: str, folder: bool) -> None:
    """Fail before any work when ``path`` cannot be written: its nearest existing ancestor is not a
    writable folder, or it exists as the wrong kind (a folder where a file goes, or the reverse).
    Raises :class:`oqcore.SaveError` naming the option and path."""
    if path is None:
        return
    if path.exists():
        if folder and not path.is_dir():
            raise SaveError(f"{option} {path}: exists and is not a folder")
        if not folder and path.is_dir():
            raise SaveError(f"{option} {path}: is a folder; give a file path for the JSON figures")
        if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            raise SaveError(f"{option} {path}: is not writable")
        return
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise SaveError(f"{option} {path}: {anc} is a file, not a folder")
    if not folder and anc != path.parent:
        # the figures are written with one open(): their folder must exist already
        raise SaveError(f"{option} {path}: folder {path.parent} does not exist; create it or give a path in an existing folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise SaveError(f"{option} {path}: folder {anc} is not writable")
    _probe_writable(anc, path, option)


def _probe_writable(folder: Path, path: Path, option: str) -> None:
    """Create and remove a scratch folder in ``folder``: ``os.access`` says yes to root everywhere
    and knows nothing of read-only or virtual file systems (``/proc``), so only trying tells.
    Raises :class:`oqcore.SaveError` naming the option and path."""
    import tempfile

    try:
        probe = tempfile.mkdtemp(prefix=".oq-probe-", dir=folder)
    except OSError as e:
        raise SaveError(f"{option} {path}: cannot write in folder {folder} ({e.strerror or e})") from None
    try:
        os.rmdir(probe)
    except OSError:  # a leftover empty scratch folder is harmless; the real write reports its own error
        pass


def _check_out(out: Path, source: Path) -> None:
    """Refuse, before the model is loaded, an ``--out`` that :func:`oqcore.save_quantized` would
    refuse after it (:func:`oqcore.export.check_destination`). Raises :class:`oqcore.SaveError`."""
    from oqcore.export import check_destination

    check_destination(out, source)


def _device(device: str | None):
    from oqcore.devices import resolve_device

    return resolve_device(device, "--device")


# ---- commands ----------------------------------------------------------------------------------


@app.command()
def keys(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the quantization key names the installed plugins registered."""
    import oqcore

    infos = oqcore.list_quant_keys()
    reg = oqcore.get_registry()
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
    """List the discovered plugins: distribution, version, status and any load error.

    The table is printed even when a plugin problem is fatal (a conflict, a failure under
    OQ_STRICT_PLUGINS=1); that error then follows as the ``error:`` line, exit status 1.
    """
    from oqcore.plugins import get_plugin_manager

    pm = get_plugin_manager()
    records = pm.plugin_records()  # every record, both sides of a conflict included; never raises for a plugin
    if as_json:
        typer.echo(json.dumps([r.__dict__ for r in records], indent=2))
    else:
        typer.echo(
            _table(
                ["plugin", "distribution", "version", "status", "error"],
                [[r.name, r.distribution, r.version, r.status, r.error or ""] for r in records],
            )
        )
    fatal = pm.fatal_error()
    if fatal is not None:
        raise fatal


@app.command()
def validate(
    args: OverridesArg = None,
    config: ConfigOpt = None,
    interpolate: InterpolateOpt = False,
) -> None:
    """Validate a config (default fp8_per_block) with overrides, and print it resolved, key names and all."""
    config, overrides = _split_args(config, args)
    cfg = build_config(config, overrides, interpolate)
    from omegaconf import OmegaConf

    typer.echo(OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict())).rstrip() or "{}  # nothing is quantized")
    typer.echo("valid")


@app.command()
def explain(
    args: OverridesArg = None,
    model: Annotated[Optional[Path], typer.Option(help="Hugging Face model folder (config.json), or a folder oq quantize --out wrote. Default: the bundled all-MiniLM-L6-v2.")] = None,
    config: ConfigOpt = None,
    device: Annotated[Optional[str], typer.Option(help="Device the layers will run on (decides backends). Default: cuda if available, else cpu.")] = None,
    interpolate: InterpolateOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show every rejected backend and why.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Show, per layer, what the config does: scheme, backend, and why (no weights are read).

    On a folder written by oq quantize --out (or oqcore.save_quantized) it shows the saved config
    and its plan.
    """
    import oqcore
    from oqcore.loading import build_meta_model, bundled_model_dir

    config, overrides = _split_args(config, args)
    dev = _device(device)
    path = model if model is not None else bundled_model_dir()
    cfg, saved, user = resolve_config(path, config, overrides, interpolate, dev)
    meta = build_meta_model(path)
    p = oqcore.plan(meta, cfg, device=dev)
    if not saved:  # what oq quantize would refuse before reading a weight, explain refuses too
        from oqcore.methods import refuse_static_online

        refuse_static_online(p.quantized)
    if as_json:
        out = {"model": str(path), "saved": saved, "config": cfg.to_dict(), "device": str(p.device), "layers": p.rows(), "summary": p.summary()}
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"model: {path} ({type(meta).__name__}), device: {p.device}")
    typer.echo(f"config: {json.dumps(cfg.to_dict())}{_config_origin(saved, user)}")
    typer.echo(p.explain(verbose=verbose))


@app.command()
def quantize(
    args: OverridesArg = None,
    model: Annotated[Optional[Path], typer.Option(help="Hugging Face model folder (config.json + safetensors), or a folder oq quantize --out wrote. Default: the bundled all-MiniLM-L6-v2.")] = None,
    config: ConfigOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Save the quantized model to this folder (oqcore.load reads it back).")] = None,
    out_format: Annotated[str, typer.Option("--format", help="Format --out writes: compressed-tensors (what llm-compressor writes and vLLM serves; the default), or oqcore (oqcore's own layout, for what compressed-tensors cannot hold).")] = DEFAULT_FORMAT,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the figures to this JSON file.")] = None,
    device: Annotated[str, typer.Option(help="Device to load onto.")] = "cpu",
    interpolate: InterpolateOpt = False,
    check: Annotated[bool, typer.Option(help="Compare against the bf16 model on bundled text (loads it too).")] = True,
    tp: Annotated[int, typer.Option("--tp", help="Mesh size: split the model over this many ranks (run under torchrun --nproc-per-node <N>; each rank reads and quantizes only its shard).")] = 1,
    parallel: Annotated[str, typer.Option(help="With --tp > 1: tp (transformers' tp_plan for the architecture) or ep (experts split by expert: ep_plan).")] = "tp",
) -> None:
    """Load a model, quantizing it while loading, and report sizes, time, memory and fidelity.

    A folder written by --out is loaded back as saved (no re-quantizing, no fidelity check).
    With --tp N, under torchrun --nproc-per-node N, every rank loads its shard; rank 0 prints the
    report (with every rank's figures) and writes --out / --json.
    """
    import torch
    from tqdm import tqdm

    import oqcore
    from oqcore.loading import bundled_model_dir

    config, overrides = _split_args(config, args)
    if out_format not in EXPORT_FORMATS:
        raise ConfigError(f"unknown format {out_format!r}; formats: {', '.join(EXPORT_FORMATS)}", "--format")
    dev = _device(device)
    with _mesh(tp, parallel, dev) as rank:
        _quantize(args, model, config, overrides, out, out_format, json_file, dev, interpolate, check, tp, parallel, rank)


@contextlib.contextmanager
def _mesh(tp: int, parallel: str, dev) -> Iterator[int]:
    """For ``--tp N > 1``: the gloo (CPU) / NCCL (CUDA) process group torchrun describes, torn
    down after; yields this process's rank (0 without ``--tp``). Raises :class:`oqcore.ConfigError`
    naming ``--tp`` / ``--parallel`` for a bad size or mode, or when not run under torchrun with
    that many processes."""
    import os

    if tp < 1:
        raise ConfigError(f"must be at least 1, got {tp}", "--tp")
    if parallel not in ("tp", "ep"):
        raise ConfigError(f"expected tp or ep, got {parallel!r}", "--parallel")
    if tp == 1:
        yield 0
        return
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        raise ConfigError(
            f"--tp {tp} runs one process per rank: start it with torchrun --nproc-per-node {tp} -m oqcore.cli quantize "
            f"--tp {tp} ...",
            "--tp",
        )
    if int(world) != tp:
        raise ConfigError(f"--tp {tp} but torchrun started {world} processes (WORLD_SIZE); they must match", "--tp")
    import torch.distributed as dist

    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def _quantize(args, model, config, overrides, out, out_format, json_file, dev, interpolate, check, tp, parallel, rank) -> None:
    """The body of ``oq quantize`` (see :func:`quantize`); only rank 0 prints and writes files."""
    import torch
    from tqdm import tqdm

    import oqcore
    from oqcore.loading import bundled_model_dir

    echo = typer.echo if rank == 0 else (lambda *a, **k: None)
    path = model if model is not None else bundled_model_dir()
    cfg, saved, user = resolve_config(path, config, overrides, interpolate, dev)
    # Destinations are checked before anything is loaded, so a bad one costs no time.
    _check_destination(out, "--out", folder=True)
    _check_destination(json_file, "--json", folder=False)
    if out is not None:
        _check_out(out, path)
    echo(f"model: {path}")
    echo(f"config: {json.dumps(cfg.to_dict())}{_config_origin(saved, user)}")
    bars: list = []  # created on the first call, when reading starts and the total is known

    def progress(done: int, total: int) -> None:
        """Advance the bar to ``done`` of ``total`` bytes read (rank 0's, under --tp)."""
        if rank != 0:
            return
        if not bars:
            bars.append(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading"))
        bars[0].update(done - bars[0].n)

    try:
        sharding = {} if tp == 1 else {"parallel": parallel}
        qmodel = oqcore.load(path, user, device=dev, progress=progress, **sharding)
    finally:
        for b in bars:
            b.close()
    rep = oqcore.report(qmodel)
    echo(str(rep))
    result: dict[str, Any] = {"model": str(path), "saved": saved, "config": cfg.to_dict(), "report": rep.to_dict()}
    if tp > 1:
        result["ranks"] = _rank_figures(qmodel)
        echo(_rank_table(result["ranks"]))
    if check and saved:
        echo("fidelity: not checked (the folder holds quantized weights: no high-precision model to compare with)")
    elif check:
        from oqcore.fidelity import compare, reference_model

        fid = compare(qmodel, reference_model(path, torch.bfloat16, dev), path)
        echo(f"fidelity: {fid}")
        result["fidelity"] = fid.to_dict()
    save_error: OqError | None = None
    if out is not None:
        try:
            oqcore.save_quantized(qmodel, out, format=out_format)
            if out_format == "oqcore":
                echo(f"saved: {out} (oqcore.load reads it back without re-quantizing)")
            else:
                echo(
                    f"saved: {out} ({out_format}: oqcore.load and vLLM read it, and transformers where its "
                    "compressed-tensors support can decompress the scheme: see docs/formats.md)"
                )
            result["out"] = str(out)
        except OqError as e:  # the figures are still written below before this is reported
            save_error = e
    if json_file is not None and rank == 0:
        text = json.dumps(result, indent=2) + "\n"
        try:
            json_file.write_text(text)
            echo(f"figures written to {json_file}")
        except OSError as e:
            echo(text, nl=False)  # the figures are not lost: they go to stdout instead
            json_error = SaveError(f"--json {json_file}: cannot write the figures ({e.strerror or e}); they are printed above instead")
            if save_error is None:
                raise json_error from e
            echo(f"error: {json_error}", err=True)  # both errors, one line each
    if save_error is not None:
        raise save_error


def _rank_figures(qmodel) -> list[dict]:
    """Every rank's load figures (an all-gather; every rank calls it)."""
    import torch.distributed as dist

    s = qmodel.oq_state.stats
    mine = {"seconds": round(s.seconds_total, 3), "bytes_read": s.bytes_read, "peak_added": s.peak_added,
            "quantized_bytes": s.quantized_bytes, "model_bytes": s.model_bytes}
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def _rank_table(ranks: list[dict]) -> str:
    """One line per rank: time, bytes read, peak memory added, shard size."""
    mib = 2**20
    lines = ["per rank:"]
    for r, f in enumerate(ranks):
        lines.append(
            f"  rank {r}: {f['seconds']:.2f} s, read {f['bytes_read'] / mib:.1f} MiB, peak +{f['peak_added'] / mib:.1f} MiB, "
            f"model shard {f['model_bytes'] / mib:.1f} MiB"
        )
    return "\n".join(lines)


_MIN_EXPERTS = 2  # every synthetic architecture routes each token to 2 experts


def _check_make_model(arch: str, hidden_size: int, intermediate_size: int, layers: int, experts: int | None) -> None:
    """Typed errors for what transformers would refuse, or crash on, only midway through the build."""
    from oqcore.synthetic import ARCHS

    if arch not in ARCHS:
        raise UnknownKeyError.for_name(arch, ARCHS, what="architecture", field="arch")
    for option, value in (("--hidden-size", hidden_size), ("--intermediate-size", intermediate_size), ("--layers", layers)):
        if value < 1:
            raise ConfigError(f"must be at least 1, got {value}", option)
    if experts is not None and experts < _MIN_EXPERTS:
        raise ConfigError(f"must be at least {_MIN_EXPERTS} (each token is routed to {_MIN_EXPERTS} experts), got {experts}", "--experts")
    if "head_dim" not in ARCHS[arch] and hidden_size % 8:
        # 4 attention heads of hidden_size / 4 each, and rotary embeddings need an even head size.
        raise ConfigError(f"must be a multiple of 8 for {arch} (4 attention heads of an even size), got {hidden_size}", "--hidden-size")


@app.command("make-model")
def make_model(
    arch: Annotated[str, typer.Argument(help="mixtral, qwen3_moe, olmoe or gpt_oss.")],
    out: Annotated[Path, typer.Argument(help="Folder to write (config.json + model.safetensors); must not exist or be empty.")],
    hidden_size: Annotated[int, typer.Option(help="Hidden size H.")] = 160,
    intermediate_size: Annotated[int, typer.Option(help="Expert intermediate size I (a multiple of every scheme's block rows, as in real models, so every scheme exports to compressed-tensors).")] = 256,
    layers: Annotated[int, typer.Option(help="Decoder layers.")] = 2,
    experts: Annotated[Optional[int], typer.Option(help="Experts per layer (default 4).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the init.")] = 0,
) -> None:
    """Write a tiny random MoE causal LM in the architecture's real on-disk layout (for trying oq quantize).

    The folder appears whole or not at all (it is written beside and renamed into place).
    """
    _check_make_model(arch, hidden_size, intermediate_size, layers, experts)
    _check_destination(out, "OUT", folder=True)
    if out.is_dir() and any(out.iterdir()):
        raise SaveError(f"{out}: the folder exists and is not empty; give a new or empty folder (make-model never overwrites)")
    from oqcore.atomic import write_folder
    from oqcore.synthetic import make_tiny_moe

    def fill(tmp: Path) -> None:
        """Write the model into the temporary sibling folder ``tmp`` (renamed into place after)."""
        make_tiny_moe(arch, tmp, hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=layers, num_experts=experts, seed=seed)

    # An existing non-empty folder is never replaced (SaveError); the model appears whole or not at all.
    write_folder(Path(os.path.abspath(out)), fill, replaceable=lambda _folder: False)
    typer.echo(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    """Run ``oq`` with the arguments ``argv`` (default ``sys.argv[1:]``) and return the exit status
    described in the module docstring (the ``oq`` console script exits with it).

    Callable from Python: ``oqcore.cli.main(["validate", "mxfp8"])`` prints what ``oq`` prints and
    returns ``0``; errors are printed as ``error:`` lines, never raised. Nothing process-wide it
    changes while running (the warning printer, third-party logger levels) stays changed after it
    returns; and unlike calling ``app()``, it installs no ``sys.excepthook`` (typer's ``Typer.__call__``
    does, for good).
    """
    group: OqGroup = typer.main.get_command(app)  # type: ignore[assignment] - app is built with cls=OqGroup
    return group.run(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
