"""Section 3c: MiniLM end to end on the CPU, the model ``oq quantize`` makes by default against its
bf16 original.

- ``bf16 (transformers)``: the bundled all-MiniLM-L6-v2 loaded with transformers in bfloat16
  (:func:`oqcore.fidelity.reference_model`), the baseline; timed before and after the others, the
  better of the two kept.
- ``oqcore default (oq quantize)``: ``oqcore.load(bundled model, <oq quantize's default config>)``
  in bfloat16. The config is the CLI's own default (:func:`oqcore.cli.build_config` with no
  ``--config``): today ``fp8_per_block`` with its default W8A8 activation; recorded in the rows.
- For information: the same default config with weight-only activations (full mode), and the float32
  original and the default quantized model loaded with ``dtype=float32`` (compared with both
  the bf16 and the fp32 original).

Inputs: the first 8 and all 32 bundled sentences (``oqcore/data/sentences.txt``), tokenized with
the model's tokenizer (padding to the longest, at most 128 tokens); a forward is
``model(**batch)`` under ``torch.no_grad``. Rows: ``model, impl, dtype, config, backend,
scheme (the weight x activation keys the quantized layers run, resolved), sentences, tokens
(padded [batch, seq]), median_s, min_s, reps, status``, ``info`` (True for
rows beside the target) and, on rows timed alternately with the bf16 original (every row but the
original's own), ``bf16_min_s, bf16_median_s``: the ratios use that paired baseline.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from bench.common import Budget, log, measure, measure_pair, not_available

MODEL = "all-MiniLM-L6-v2"
SENTENCES = (8, 32)
BF16_IMPL = "bf16 (transformers)"
FP32_IMPL = "fp32 (transformers)"
DEFAULT_IMPL = "oqcore default (oq quantize)"
MAX_LENGTH = 128


def _inputs(path, counts: tuple[int, ...]) -> dict[int, dict[str, torch.Tensor]]:
    """``{n: tokenized first n bundled sentences}``."""
    from transformers import AutoTokenizer

    from oqcore.fidelity import bundled_sentences

    sentences = bundled_sentences()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    out = {}
    for n in counts:
        picked = (sentences * (n // len(sentences) + 1))[:n]  # repeated if ever asked for more than shipped
        out[n] = dict(tok(picked, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))
    return out


def _time(model, inputs: dict[int, dict[str, torch.Tensor]], budget: Budget, ref=None) -> dict[int, dict[str, Any]]:
    """Per sentence count: seconds per forward (with ``ref``, the bf16 original, timed alternately
    with it: ``bf16_min_s`` / ``bf16_median_s`` beside the row's own), or the reason it failed."""
    out = {}
    for n, batch in inputs.items():
        try:
            with torch.no_grad():
                if ref is None:
                    out[n] = {**measure(lambda b=batch: model(**b), budget), "status": "ok"}
                else:
                    mine, base = measure_pair(lambda b=batch: model(**b), lambda b=batch: ref(**b), budget)
                    out[n] = {**mine, "bf16_min_s": base["min_s"], "bf16_median_s": base["median_s"], "status": "ok"}
        except Exception as e:
            out[n] = {"status": not_available(e)}
    return out


def _better(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    from bench.forward import _better as better

    return better(a, b)


def _backends(model) -> str:
    from bench.forward import _backends as names

    return names(model, "linear")


def _resolved(model) -> str:
    """What the quantized layers of ``model`` run, resolved (an omitted activation means the
    scheme's default): ``"<weight key> x <activation key or none>"``, comma-separated when the
    layers differ."""
    import oqcore

    reg = oqcore.get_registry()
    seen = []
    for mod in model.modules():
        method = getattr(mod, "method", None)
        if method is None or not hasattr(method, "activation_key"):
            continue
        act = "none" if method.activation_key is None else reg.name_of(method.activation_key, "activation")
        seen.append(f"{reg.key_name(method.weight_key)} x {act}")
    return ", ".join(dict.fromkeys(seen)) or "nothing quantized"


def default_config() -> dict[str, Any]:
    """The config ``oq quantize`` uses when given none, as a plain dict."""
    from oqcore.cli import build_config

    return build_config(None, []).to_dict()


def _weight_only(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with every slot's activation set to ``None`` (weight-only)."""
    out = copy.deepcopy(cfg)
    for slot in ("linear", "moe"):
        if isinstance(out.get(slot), dict):
            out[slot]["activation"] = None
    return out


def run(budget: Budget, counts: tuple[int, ...] = SENTENCES, quick: bool = False) -> list[dict[str, Any]]:
    """The MiniLM rows (see the module docstring); a variant that fails becomes rows saying why.
    ``quick`` leaves out the weight-only info row."""
    import oqcore
    from oqcore.fidelity import reference_model
    from oqcore.loading import bundled_model_dir

    path = bundled_model_dir()
    rows: list[dict[str, Any]] = []

    def add(impl, dtype, timings, config=None, backend="", info=False, scheme=""):
        """Append one row per sentence count."""
        for n, t in timings.items():
            tokens = list(inputs[n]["input_ids"].shape) if n in inputs else None
            rows.append(
                {
                    "model": MODEL,
                    "impl": impl,
                    "dtype": dtype,
                    "config": config,
                    "backend": backend,
                    "scheme": scheme,
                    "info": info,
                    "sentences": n,
                    "tokens": tokens,
                    **t,
                }
            )

    def failed(impl, dtype, e, config=None, info=False):
        """Rows saying why ``impl`` was not timed."""
        add(impl, dtype, {n: {"status": not_available(e)} for n in counts}, config, info=info)

    try:
        inputs = _inputs(path, counts)
        log(f"minilm: {BF16_IMPL}")
        bf16 = reference_model(path, torch.bfloat16)
        first = _time(bf16, inputs, budget)
    except Exception as e:
        inputs = {}
        failed(BF16_IMPL, "bfloat16", e)
        return rows
    cfg = default_config()
    variants = [
        (DEFAULT_IMPL, cfg, torch.bfloat16, False),
        ("oqcore default, weight-only", _weight_only(cfg), torch.bfloat16, True),
        (f"{DEFAULT_IMPL}, fp32", cfg, torch.float32, True),
    ]
    if quick:
        variants.pop(1)
    timed = []
    default_model = None
    for impl, c, dtype, info in variants:
        log(f"minilm: {impl}")
        try:
            model = oqcore.load(path, c, dtype=dtype)
        except Exception as e:
            timed.append((impl, str(dtype).removeprefix("torch."), {n: {"status": not_available(e)} for n in counts}, c, "", info, ""))
            continue
        t = _time(model, inputs, budget, bf16)
        timed.append((impl, str(dtype).removeprefix("torch."), t, c, _backends(model), info, _resolved(model)))
        if impl == DEFAULT_IMPL:
            default_model = model  # timed a second time at the end, like the baseline
        del model
    log(f"minilm: {FP32_IMPL}")
    try:
        fp32 = reference_model(path, torch.float32)
        fp32_t = _time(fp32, inputs, budget, bf16)
        del fp32
    except Exception as e:
        fp32_t = {n: {"status": not_available(e)} for n in counts}
    log(f"minilm: {BF16_IMPL} and {DEFAULT_IMPL} again")
    add(BF16_IMPL, "bfloat16", _better(first, _time(bf16, inputs, budget)))
    if default_model is not None:
        impl, dtype, t, c, backend, info, scheme = timed[0]
        timed[0] = (impl, dtype, _better(t, _time(default_model, inputs, budget, bf16)), c, backend, info, scheme)
    for impl, dtype, t, c, backend, info, scheme in timed:
        add(impl, dtype, t, c, backend, info, scheme)
    add(FP32_IMPL, "float32", fp32_t, info=True)
    return rows
