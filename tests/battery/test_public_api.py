"""Only OqError subclasses leave the public API: the safety net around every public function."""

from __future__ import annotations

import inspect

import pytest
import torch

import oqcore
from oqcore.errors import InternalError, OqError

FUNCTIONS = [n for n in oqcore.__all__ if inspect.isfunction(getattr(oqcore, n)) and n != "hookimpl"]


def test_every_public_function_is_guarded():
    unguarded = [n for n in FUNCTIONS if not hasattr(getattr(oqcore, n), "__wrapped__")]
    assert FUNCTIONS and not unguarded, f"public functions without the OqError guard: {unguarded}"


def test_unexpected_exception_becomes_internal_error():
    def broken(model):
        raise KeyError("boom")

    guarded = oqcore.errors.public_api(broken)
    with pytest.raises(InternalError, match=r"oqcore\.broken: unexpected KeyError: 'boom'") as info:
        guarded(torch.nn.Linear(2, 2))
    assert isinstance(info.value.__cause__, KeyError)


def test_oq_errors_pass_through_unchanged():
    with pytest.raises(OqError, match="no oq_state") as info:
        oqcore.report(torch.nn.Linear(2, 2))
    assert type(info.value) is not InternalError


def test_keyboard_interrupt_is_not_wrapped():
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        oqcore.errors.public_api(interrupted)()


_LINEAR = lambda: torch.nn.Sequential(torch.nn.Linear(64, 64))  # noqa: E731

WRONG_TYPES = {
    "load-path-None": (lambda: oqcore.load(None), oqcore.CheckpointError, "NoneType"),
    "load-path-int": (lambda: oqcore.load(123), oqcore.CheckpointError, "int"),
    "load-config-list": (lambda: oqcore.load(".", ["fp8_per_block"]), oqcore.OqError, ""),
    "quantize_-None": (lambda: oqcore.quantize_(None, "fp8_per_block"), oqcore.ConfigError, "model"),
    "quantize_-config-int": (lambda: oqcore.quantize_(_LINEAR(), 5), oqcore.ConfigError, "int"),
    "reload-model-None": (lambda: oqcore.reload_weights(None, {}), oqcore.ConfigError, "model"),
    "save-model-None": (lambda: oqcore.save_quantized(None, "x"), oqcore.SaveError, "NoneType"),
    "report-None": (lambda: oqcore.report(None), oqcore.OqError, "NoneType"),
    "plan-None": (lambda: oqcore.plan(None, "fp8_per_block"), oqcore.ConfigError, "model"),
    "plan-config-None": (lambda: oqcore.plan(_LINEAR(), None), oqcore.ConfigError, "quantizes nothing"),
    "quantize_tensor-key-None": (lambda: oqcore.quantize_tensor(torch.randn(4, 64), None), oqcore.ConfigError, "key"),
    "quantize_tensor-tensor-None": (lambda: oqcore.quantize_tensor(None, "mxfp8"), oqcore.UnsupportedLayerError, "NoneType"),
    "quant_key-None": (lambda: oqcore.quant_key(None), oqcore.ConfigError, "NoneType"),
    "quant_key-int": (lambda: oqcore.quant_key(5), oqcore.ConfigError, "int"),
    "quant_key-role": (lambda: oqcore.quant_key("mxfp8", role=5), oqcore.ConfigError, "role"),
    "select_backend-device-None": (lambda: oqcore.select_backend("l", _LINEAR(), [], None, None), oqcore.ConfigError, "device"),
    "select_backend-candidates": (lambda: oqcore.select_backend("l", _LINEAR(), [1], None, "cpu"), oqcore.ConfigError, "Backend"),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES), ids=list(WRONG_TYPES))
def test_wrong_argument_types_are_typed_errors(case):
    call, exc, culprit = WRONG_TYPES[case]
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is not InternalError, str(info.value)
    assert culprit in str(info.value)
