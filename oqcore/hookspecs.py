"""Every hook a scheme plugin can implement. The built-in schemes use exactly these.

A plugin is a module (found through the entry-point group ``"oqcore"``) whose functions carry the
:data:`hookimpl` marker and are named like the specs below (an instance whose methods carry it
works too; a class does not). Each registration hook receives a ``register`` callable bound to the
plugin, so the core knows which plugin provided what and can name both plugins when two register
the same thing. Hook implementations may take any subset of a spec's arguments (pluggy passes them
by name).

What the core refuses, so a plugin never half-works (the plugin is recorded as failed, with its
name, its distribution and the hook in the message; ``OQ_STRICT_PLUGINS=1`` makes it an error):

- an object with no marked hook, or a marked function whose name is not one of these hooks (a typo
  such as ``oq_register_method``; mark a hook of a newer oqcore ``optionalhook=True``);
- defaults on hook arguments (pluggy never passes them), ``hookwrapper``/``wrapper`` hooks, a
  registration hook without the ``register`` argument;
- a registration hook that returns anything but ``None``, calls ``register`` with arguments of the
  wrong type, or calls it after returning. Registrations are committed only when the hook returns,
  and a plugin failing in any hook keeps none of its registrations;
- the same thing registered twice by one plugin. Registered by two plugins it is a
  :class:`oqcore.PluginConflictError`, fatal whatever the mode: which one to use is the user's call.

Hooks run with the plugin registry under construction: do not call :func:`oqcore.get_registry`
(or anything that resolves a key name) at import time or in a registration hook; that is a
:class:`oqcore.PluginError`. Inside the functions you register it is fine.
"""

from __future__ import annotations

import pluggy

PROJECT = "oqcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def oq_register_schemes(register):
    """Register schemes: call ``register(scheme)`` once per weight key with an :class:`oqcore.Scheme`.

    The record states everything about the scheme once (kinds, activation keys and the default,
    options model, each key's :class:`oqcore.KeyFormat` with its quantizer implementations, forward
    backends, method classes for what differs from the base classes); the core derives the method
    classes, the quantizer candidates and the reference ``torch`` forward backend. Name the keys in
    ``oq_register_quant_keys`` first (the weight key must have a weight name). This is contract v2:
    a scheme registered here needs none of ``oq_register_methods``, ``oq_register_quantizers`` or
    ``oq_backend_candidates`` (v1 hooks, still supported, which a Scheme expands to).

    A record that is not a well-formed :class:`oqcore.Scheme` fails the plugin (the message says which
    field); a method, format, quantizer implementation or backend another plugin registered for the
    same key is a :class:`oqcore.PluginConflictError` naming both plugins.
    """


@hookspec
def oq_register_quant_keys(register):
    """Register quantization key names.

    Call ``register(name, key=None, *, weight=None, activation=None, aliases=(), description="")``
    once per name. ``key`` gives one :class:`oqcore.QuantKey` for both roles; ``weight`` /
    ``activation`` give role-aware keys (``mxfp8``: static blocks as a weight, dynamic as an
    activation) or restrict a name to one role. Names and aliases are letters, digits, ``_``, ``.``
    and ``-``; ``aliases`` a list or tuple of them. A name, alias or key (in a role) another plugin
    registered is a :class:`oqcore.PluginConflictError` naming both plugins; one key has one name
    (use ``aliases=`` for more).
    """


@hookspec
def oq_register_shorthands(register):
    """Register config shorthands: one name that fills the ``linear`` and/or ``moe`` slots.

    Call ``register(name, *, linear=None, moe=None, description="")`` where each slot is a spec
    mapping such as ``{"weight": "fp8_per_block_static"}`` (activation omitted means "the method's
    default") or ``None`` when the shorthand does not define that slot (``int8_per_channel_weight_only``
    has no linear spec, and using it for ``linear`` is a :class:`oqcore.ConfigError`). A shorthand
    name another plugin registered is a :class:`oqcore.PluginConflictError`.
    """


@hookspec
def oq_register_methods(register):
    """v1: register online quantization methods (derived from a :class:`oqcore.Scheme` in v2).

    Call ``register(kind, weight_key, method_cls)`` with ``kind`` in ``{"linear", "moe"}``,
    ``weight_key`` a :class:`oqcore.QuantKey` (or a registered weight key name) and ``method_cls`` a
    subclass of :class:`oqcore.OnlineLinearMethodBase` or :class:`oqcore.OnlineMoEMethodBase`
    whose ``weight_key`` equals ``weight_key``. One method per (kind, weight key): a second one from
    another plugin is a :class:`oqcore.PluginConflictError`.
    """


@hookspec
def oq_register_quantizers(register):
    """v1: register tensor quantizers (a :class:`oqcore.Scheme` 's :class:`oqcore.KeyFormat` declares them in v2).

    Call ``register(key, name, quantize, dequantize)``: ``key`` a :class:`oqcore.QuantKey` (weight
    or activation) or a registered name (then every key it means, in either role), ``name`` the
    implementation's name (``"torch"`` is the reference every other implementation must match byte
    for byte; the v1 contract called it the backend),
    ``quantize(w, options) -> (qdata, scale)`` for ``w`` of shape ``[N, K]`` or ``[E, N, K]`` and
    ``dequantize(qdata, scale, dtype, options) -> Tensor``. ``options`` is the method's validated
    options model instance or ``None``.

    ``priority=0`` and ``is_supported(device, shape, dtype) -> (ok, reason)`` (default: any input)
    make it an oracle candidate like a v2 :class:`oqcore.QuantizerImpl`. Keyword flags (plain facts
    about the quantizer, default ``False``): ``checks_finite=True`` when
    ``quantize`` itself raises :class:`oqcore.NonFiniteError` for NaN/Inf input (the core then
    skips its own full pass over the tensor); ``whole_stack=True`` when an ``[E, N, K]`` stack in
    one call needs no memory beyond the outputs (the core otherwise calls it once per expert, so a
    reference's float32 temporaries stay one expert large).

    Errors (the contract the core holds every quantizer to, so users see one typed error naming
    the tensor or layer and the plugin):

    - raise ``ValueError`` for input the quantizer cannot take (a shape outside its rule, such as
      K not a multiple of the block size), with a message stating the rule: the core turns it into
      :class:`oqcore.UnsupportedLayerError` naming the tensor/layer, the key, the backend and the
      plugin, your message included;
    - raise :class:`oqcore.NonFiniteError` for NaN/Inf (required with ``checks_finite=True``; the
      core then names the layer, the expert and the count); any other :class:`oqcore.OqError`
      passes through unchanged;
    - any other exception is a bug: the core raises :class:`oqcore.PluginError` naming the plugin,
      the key, the backend and the tensor, with your exception chained as ``__cause__``.

    Return exactly ``(qdata, scale)``, two tensors, ``qdata`` of the input's shape (anything else
    is a :class:`oqcore.PluginError`), and never modify ``w`` in place: when a quantizer fails
    mid-way through a model, :func:`oqcore.quantize_` and :func:`oqcore.reload_weights` promise
    the model is left bit for bit as it was. The core only hands a quantizer 2-D/3-D tensors with
    at least one element in float32, bfloat16, float16 or float64; a meta tensor reaches only the
    ``torch`` reference (a dry run for shapes: keep the reference free of data-dependent Python
    control flow such as ``.item()``).
    """


@hookspec
def oq_backend_candidates(kind, weight_key):
    """v1: return the :class:`oqcore.Backend` records this plugin offers for ``(kind, weight_key)``
    (a :class:`oqcore.Scheme` 's ``backends`` in v2; both are offered to the oracle).

    ``kind`` is ``"linear"`` or ``"moe"``; ``weight_key`` a :class:`oqcore.QuantKey`. Return a list
    (empty, or ``None``, when the plugin has nothing for that pair). Each record names the
    activation key it serves (a :class:`oqcore.QuantKey` or ``None``), an int priority (higher
    wins; ties broken by name, never by registration order) and an
    ``is_supported(layer, device) -> (ok, reason)`` predicate. The core's oracle chooses among all
    plugins' candidates; the core fills in ``Backend.plugin``.

    A result that is not a list of well-typed :class:`oqcore.Backend` records (or offers one
    ``(name, activation key)`` twice) fails the plugin, as an exception here does: it then
    contributes nothing, from that call on. Two plugins offering the same ``(name, activation
    key)`` for a pair is a :class:`oqcore.PluginConflictError` (a pin by name could not tell them
    apart): name your backends after your plugin.
    """
