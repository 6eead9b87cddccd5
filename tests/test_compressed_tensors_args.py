"""Each scheme declares how it reads in compressed-tensors (KeyFormat.compressed_tensors, the
QuantizationArgs fields, and Scheme.compressed_tensors_format): checked against compressed-tensors
itself: its presets for the schemes llm-compressor ships, its own format inference for every pair."""

from __future__ import annotations

import pytest
import torch

import oqcore

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.format import infer_module_format  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES  # noqa: E402

PRESETS = [
    # (oqcore linear spec, compressed-tensors preset, compare the activations too)
    ({"weight": "fp8_per_channel_static", "activation": "fp8_per_token"}, "FP8_DYNAMIC", True),
    ({"weight": "fp8_per_block_static", "activation": "fp8_per_block_dynamic"}, "FP8_BLOCK", True),
    ({"weight": "mxfp8", "activation": "mxfp8"}, "MXFP8", True),
    ({"weight": "mxfp8", "activation": None}, "MXFP8A16", True),
    ({"weight": "int8_per_channel_static", "activation": "int8_per_token"}, "W8A8", True),
    # compressed-tensors' FP8: static (calibrated) per-tensor input scales, read from checkpoints
    ({"weight": "fp8_per_tensor_static", "activation": "fp8_per_tensor_static"}, "FP8", True),
    ({"weight": "mxfp4", "activation": None}, "MXFP4A16", True),
    ({"weight": "mxfp4", "activation": "mxfp4"}, "MXFP4", True),
    ({"weight": "nvfp4", "activation": None}, "NVFP4A16", True),
    # compressed-tensors' NVFP4 activations carry a calibrated global scale: oqcore's dynamic nvfp4
    # activations have no form there, the weights are the preset's
    ({"weight": "nvfp4", "activation": None}, "NVFP4", False),
]


def _args(fmt) -> QuantizationArgs | None:
    return None if fmt is None else QuantizationArgs.model_validate(dict(fmt.compressed_tensors))


def _written(args: QuantizationArgs | None) -> dict | None:
    """The args as a checkpoint's config carries them: zp_dtype is in-memory only (never written;
    these schemes are symmetric, without zero points); the observer is how llm-compressor calibrates
    (FP8's ``static_minmax``), which oqcore's group matching does not compare either."""
    return None if args is None else args.model_dump(exclude={"zp_dtype", "observer", "observer_kwargs"})


@pytest.mark.parametrize("spec, preset, with_activation", PRESETS, ids=[p for _, p, _ in PRESETS])
def test_declared_args_equal_the_preset(spec, preset, with_activation):
    from oqcore.config import bind_spec

    bound = bind_spec(spec, "linear")
    expected = PRESET_SCHEMES[preset]
    assert _written(_args(bound.formats.weight)) == _written(expected["weights"])
    if with_activation:
        assert _written(_args(bound.formats.activation)) == _written(expected.get("input_activations"))


def _pairs():
    reg = oqcore.get_registry()
    for scheme in reg.schemes.values():
        for act in scheme.activation_keys:
            yield scheme, act


PAIRS = 18
"""fp8: 4 (static activations too) + 3 + 2, mxfp8: 2, int8: 2, mxfp4: 3 (none, mxfp8, mxfp4), nvfp4: 2."""


@pytest.mark.parametrize("pair", list(range(PAIRS)))
def test_declared_format_is_the_one_compressed_tensors_infers(pair):
    pairs = list(_pairs())
    assert len(pairs) == PAIRS
    scheme, act = pairs[pair]
    weights = _args(scheme.weight)
    act_fmt = scheme.activation_format(act)
    if act is not None and act_fmt.compressed_tensors is None:
        # no compressed-tensors form (nvfp4's dynamic global scale): no format declared either
        assert act not in scheme.compressed_tensors_format, (scheme.name, act)
        return
    activations = _args(act_fmt)
    inferred = infer_module_format(torch.nn.Linear, QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations))
    assert scheme.compressed_tensors_format[act] == inferred.value, (scheme.name, act)
