"""Layer-name patterns used by ``ignore`` and ``targets``.

A pattern is ``re:<regex>`` (full match against the module's qualified name, as compressed-tensors
does), an fnmatch glob when it holds ``*``, ``?`` or ``[`` (``model.layers.*.mlp.experts``), or else
an exact name.
"""

from __future__ import annotations

import fnmatch
import re
from functools import lru_cache

_GLOB_CHARS = frozenset("*?[")


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    return re.compile(fnmatch.translate(pattern))


def is_exact(pattern: str) -> bool:
    """True for a plain name (neither ``re:`` nor a glob)."""
    return not pattern.startswith("re:") and not (_GLOB_CHARS & set(pattern))


def matches(pattern: str, name: str) -> bool:
    """Whether layer ``name`` matches ``pattern`` (exact, ``re:`` full match, or glob)."""
    if is_exact(pattern):
        return pattern == name
    return _compile(pattern).fullmatch(name) is not None
