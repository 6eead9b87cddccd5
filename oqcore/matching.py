"""Layer-name patterns used by ``ignore`` and ``targets``, with vLLM's meaning.

A pattern is one of:

- ``re:<regex>``: matched from the **start** of the module's qualified name with Python
  ``re.match`` (not a full match), as vLLM's ``is_equal_or_regex_match`` and compressed-tensors'
  matcher do. So ``re:.*mlp`` matches ``model.layers.0.mlp.gate`` (anchor the end with ``$`` to
  match only names ending in ``mlp``), and ``re:q_proj`` matches nothing in
  ``model.layers.0.self_attn.q_proj`` (the name does not start with it);
- an fnmatch glob when it holds ``*``, ``?`` or ``[`` (``model.layers.*.mlp.experts``; ``*`` also
  crosses dots), matched against the whole name, case-sensitively;
- else an exact name.
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
    """Whether layer ``name`` matches ``pattern``: exact, ``re:`` (``re.match``, from the start of
    the name) or glob (whole name)."""
    if is_exact(pattern):
        return pattern == name
    if pattern.startswith("re:"):
        return _compile(pattern).match(name) is not None
    # fnmatch.translate ends with \Z, so match() is a whole-name match here
    return _compile(pattern).match(name) is not None
