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
