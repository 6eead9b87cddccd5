"""Bad-input battery: plugins. Every case is a real distribution on sys.path (tests/fakedist.py), so
discovery goes through ``importlib.metadata`` entry points exactly as for an installed package.

- conflicts (one entry-point name in two distributions, a third-party ``fp8``, any name or backend
  registered by two plugins) are a ``PluginConflictError`` naming both plugins and distributions,
  on every access until the plugin set changes;
- a broken plugin (any exception at import or in a hook, ``SystemExit`` included, garbage results,
  unusable entry points, misspelt hooks, wrong argument types) is recorded as ``failed`` with a
  message naming the plugin, its distribution and the import/hook, warns, contributes nothing, and
  leaves the built-ins working; with ``OQ_STRICT_PLUGINS=1`` it is a ``PluginError`` on every access;
- ``KeyboardInterrupt`` propagates and leaves the manager as it was;
- the environment variables are parsed strictly; two threads first-touching the registry load once.
"""

from __future__ import annotations

import textwrap
import threading

import pytest

import oqcore
from oqcore import ConfigError, PluginConflictError, PluginError
from oqcore.plugins import PluginWarning, get_plugin_manager, reset_plugin_manager
from fakedist import install_fake_dist
from battery.util import raises_naming

BUILTINS = ("fp8", "int8", "mxfp4", "mxfp8", "nvfp4")

HEAD = textwrap.dedent(
    """
    import torch
    from oqcore import Backend, GroupShape, OnlineLinearMethodBase, QuantKey, ScaleDesc, hookimpl

    KEY = QuantKey(torch.uint8, ScaleDesc(torch.float32, True, GroupShape(1, 16)), symmetric=False)

    class Method(OnlineLinearMethodBase):
        weight_key = KEY

    def q(w, options):
        return w, w

    """
)

KEYS_OK = "@hookimpl\ndef oq_register_quant_keys(register):\n    register('bt_key', KEY)\n"


def src(body: str) -> str:
    return HEAD + textwrap.dedent(body)


def fp8_key():
    from oq_plugin_fp8 import keys

    return keys.kFp8StaticTensorSym


# ----------------------------------------------------------------------------------------------
# Contained failures: (case id, module source or None for "no such module", entry-point target,
# the hook named in the record, a fragment of the message). The module is ``oqb_<id>``.
# ----------------------------------------------------------------------------------------------

CANDIDATES = "oq_backend_candidates"

FAILURES = [
    ("systemexit_at_import", "raise SystemExit(3)\n", None, "import", "SystemExit: 3"),
    (
        "baseexception_at_import",
        "class Weird(BaseException):\n    pass\nraise Weird('not an Exception')\n",
        None,
        "import",
        "Weird: not an Exception",
    ),
    ("error_at_import", "import json\njson.loads('{')\n", None, "import", "JSONDecodeError"),
    ("missing_module", None, None, "import", "ModuleNotFoundError: No module named 'oqb_missing_module'"),
    ("missing_attribute", src(KEYS_OK), ":nope", "import", "AttributeError"),
    ("object_is_an_int", "VALUE = 3\n", ":VALUE", "entry point", "has no oqcore hook implementations"),
    ("module_without_hooks", "def helper():\n    pass\n", None, "entry point", "has no oqcore hook implementations"),
    (
        "hooks_without_marker",
        "def oq_register_quant_keys(register):\n    pass\n",
        None,
        "entry point",
        "oq_register_quant_keys lack(s) the @oqcore.hookimpl marker",
    ),
    (
        "entry_point_is_a_class",
        src("class Plugin:\n    @hookimpl\n    def oq_register_quant_keys(self, register):\n        register('bt_key', KEY)\n"),
        ":Plugin",
        "entry point",
        "is the class oqb_entry_point_is_a_class.Plugin; use a module or an instance",
    ),
    (
        "misspelt_hook",
        src(KEYS_OK + "@hookimpl\ndef oq_register_method(register):\n    pass\n"),
        None,
        "entry point",
        "implements 'oq_register_method', which is not an oqcore hook (did you mean 'oq_register_methods'?)",
    ),
    (
        "hook_argument_default",
        src("@hookimpl\ndef oq_backend_candidates(kind, weight_key=None):\n    return []\n"),
        None,
        "entry point",
        "gives hook oq_backend_candidates default values for weight_key",
    ),
    (
        "hookwrapper",
        src("@hookimpl(hookwrapper=True)\ndef oq_register_quant_keys(register):\n    yield\n"),
        None,
        "entry point",
        "makes hook oq_register_quant_keys a wrapper",
    ),
    (
        "argument_not_in_spec",
        src("@hookimpl\ndef oq_register_quant_keys(register, extra):\n    pass\n"),
        None,
        "entry point",
        "is not a valid plugin: ",
    ),
    (
        "registration_hook_without_register",
        src("@hookimpl\ndef oq_register_quant_keys():\n    pass\n"),
        None,
        "entry point",
        "defines hook oq_register_quant_keys without the argument 'register'",
    ),
    (
        "systemexit_in_registration_hook",
        src("@hookimpl\ndef oq_register_quant_keys(register):\n    register('bt_key', KEY)\n    raise SystemExit('bye')\n"),
        None,
        "oq_register_quant_keys",
        "in hook oq_register_quant_keys: SystemExit: bye",
    ),
    (
        "registration_hook_returns_a_value",
        src("@hookimpl\ndef oq_register_quant_keys(register):\n    return {'bt_key': KEY}\n"),
        None,
        "oq_register_quant_keys",
        "returned dict; a registration hook calls register(...) and returns None",
    ),
    (
        "key_of_wrong_type",
        src("@hookimpl\ndef oq_register_quant_keys(register):\n    register('bt_key', 'fp8_per_tensor_static')\n"),
        None,
        "oq_register_quant_keys",
        "key 'bt_key': key= must be a QuantKey, got str",
    ),
    (
        "key_name_not_a_str",
        src("@hookimpl\ndef oq_register_quant_keys(register):\n    register(7, KEY)\n"),
        None,
        "oq_register_quant_keys",
        "key name must be a str, got int 7",
    ),
    (
        "key_name_with_spaces",
        src("@hookimpl\ndef oq_register_quant_keys(register):\n    register('bt key', KEY)\n"),
        None,
        "oq_register_quant_keys",
        "key name 'bt key' is not a valid name",
    ),
    (
        "aliases_as_a_str",
        src("@hookimpl\ndef oq_register_quant_keys(register):\n    register('bt_key', KEY, aliases='btk')\n"),
        None,
        "oq_register_quant_keys",
        "aliases= must be a list or tuple of names, got str 'btk'",
    ),
    (
        "unknown_register_argument",
        src("@hookimpl\ndef oq_register_quant_keys(register):\n    register('bt_key', KEY, alias=('btk',))\n"),
        None,
        "oq_register_quant_keys",
        "TypeError: ",
    ),
    (
        "same_key_twice_in_one_plugin",
        src("@hookimpl\ndef oq_register_quant_keys(register):\n    register('bt_key', KEY)\n    register('bt_key2', KEY)\n"),
        None,
        "oq_register_quant_keys",
        "registers key name 'bt_key2' and 'bt_key': they clash",
    ),
    (
        "shorthand_slot_not_a_mapping",
        src(KEYS_OK + "@hookimpl\ndef oq_register_shorthands(register):\n    register('bt', linear='bt_key')\n"),
        None,
        "oq_register_shorthands",
        "shorthand 'bt': linear= must be a spec mapping",
    ),
    (
        "method_for_unknown_key_name",
        src(KEYS_OK + "@hookimpl\ndef oq_register_methods(register):\n    register('linear', 'bt_kee', Method)\n"),
        None,
        "oq_register_methods",
        "'bt_kee'; did you mean 'bt_key'?",
    ),
    (
        "method_weight_key_mismatch",
        src(
            KEYS_OK
            + "class Other(OnlineLinearMethodBase):\n    weight_key = None\n"
            + "@hookimpl\ndef oq_register_methods(register):\n    register('linear', KEY, Other)\n"
        ),
        None,
        "oq_register_methods",
        "Other.weight_key (None) does not match the key it is registered for (bt_key)",
    ),
    (
        "quantizer_not_callable",
        src(KEYS_OK + "@hookimpl\ndef oq_register_quantizers(register):\n    register(KEY, 'torch', 'q', q)\n"),
        None,
        "oq_register_quantizers",
        "quantize of the 'torch' quantizer must be callable, got str",
    ),
    (
        "quantizer_flag_not_a_bool",
        src(KEYS_OK + "@hookimpl\ndef oq_register_quantizers(register):\n    register(KEY, 'torch', q, q, whole_stack='yes')\n"),
        None,
        "oq_register_quantizers",
        "whole_stack of the 'torch' quantizer must be True or False, got str 'yes'",
    ),
    (
        "registry_used_at_import",
        src("import oqcore\nFP8 = oqcore.quant_key('fp8_per_tensor_static')\n" + KEYS_OK),
        None,
        "import",
        "tried to read the plugin registry while the plugins are being loaded",
    ),
    (
        "systemexit_in_candidates",
        src("@hookimpl\ndef oq_backend_candidates(kind, weight_key):\n    raise SystemExit(2)\n"),
        None,
        CANDIDATES,
        "in hook oq_backend_candidates(kind='linear', weight_key=fp8_per_tensor_static): SystemExit: 2",
    ),
    (
        "candidates_single_backend",
        src("@hookimpl\ndef oq_backend_candidates(kind, weight_key):\n    return Backend('bt', None)\n"),
        None,
        CANDIDATES,
        "returned a single Backend; return a list of Backend",
    ),
    (
        "candidates_not_a_list",
        src("@hookimpl\ndef oq_backend_candidates(kind, weight_key):\n    return {'bt': None}\n"),
        None,
        CANDIDATES,
        "returned dict; return a list of oqcore.Backend",
    ),
    (
        "candidates_activation_key_as_name",
        src("@hookimpl\ndef oq_backend_candidates(kind, weight_key):\n    return [Backend('bt', 'fp8_per_token')]\n"),
        None,
        CANDIDATES,
        "Backend 'bt': activation_key must be a QuantKey or None, got str 'fp8_per_token'",
    ),
    (
        "candidates_priority_not_an_int",
        src("@hookimpl\ndef oq_backend_candidates(kind, weight_key):\n    return [Backend('bt', None, priority='high')]\n"),
        None,
        CANDIDATES,
        "Backend 'bt': priority must be an int, got str 'high'",
    ),
    (
        "candidates_same_backend_twice",
        src("@hookimpl\ndef oq_backend_candidates(kind, weight_key):\n    return [Backend('bt', None), Backend('bt', None)]\n"),
        None,
        CANDIDATES,
        "offers backend 'bt' for activation none twice",
    ),
]


def _install_failure(tmp_path, monkeypatch, case, source, target):
    module = f"oqb_{case}"
    files = {} if source is None else {f"{module}.py": source}
    install_fake_dist(tmp_path, monkeypatch, f"oq-bad-{case}", {"bad": module + (target or "")}, files)
    return f"'bad' (distribution oq-bad-{case} 0.1.0)"


def _touch(pm, hook):
    """What makes the plugin's failure happen: the registry, plus a backend query for hook failures there."""
    pm.registry
    if hook == CANDIDATES:
        pm.backend_candidates("linear", fp8_key())


@pytest.mark.parametrize("case, source, target, hook, fragment", FAILURES, ids=[c[0] for c in FAILURES])
def test_failing_plugin_is_contained_and_reported(tmp_path, monkeypatch, case, source, target, hook, fragment):
    label = _install_failure(tmp_path, monkeypatch, case, source, target)
    pm = get_plugin_manager()
    with pytest.warns(PluginWarning) as warned:
        _touch(pm, hook)
    record = pm.records["bad"]
    assert (record.status, record.hook) == ("failed", hook), record
    assert record.error.startswith(f"plugin {label} failed "), record.error
    assert fragment in record.error
    if hook not in ("import", "entry point"):
        assert f"in hook {hook}" in record.error
    assert any(record.error in str(w.message) for w in warned)
    # the built-ins keep working, and the failed plugin contributes nothing
    assert all(pm.records[n].status == "loaded" for n in BUILTINS)
    reg = pm.registry
    assert "bt_key" not in reg.keys.names() and "fp8_per_block_static" in reg.keys.names()
    assert all(b.plugin != "bad" for b in pm.backend_candidates("linear", fp8_key()))


STRICT_CASES = ["systemexit_at_import", "misspelt_hook", "systemexit_in_registration_hook", "systemexit_in_candidates"]


@pytest.mark.parametrize("case", STRICT_CASES)
def test_strict_mode_makes_a_failure_fatal_on_every_access(tmp_path, monkeypatch, case):
    _, source, target, hook, fragment = next(c for c in FAILURES if c[0] == case)
    label = _install_failure(tmp_path, monkeypatch, case, source, target)
    monkeypatch.setenv("OQ_STRICT_PLUGINS", "1")
    pm = get_plugin_manager()
    errors = []
    for _ in range(3):  # the first access and every later one
        with raises_naming(PluginError, f"plugin {label} failed", fragment, "OQ_STRICT_PLUGINS") as e:
            _touch(pm, hook)
        errors.append(e.value)
    assert type(errors[0]) is PluginError and len({id(x) for x in errors}) == 3  # fresh each time
    assert len({str(x) for x in errors}) == 1
    with raises_naming(PluginError, label):
        oqcore.quant_key("fp8_per_block_static")  # any registry user, not only the manager
    pm.unregister("bad")  # the plugin set changed: fatal no more
    assert "fp8_per_block_static" in pm.registry.keys.names()


def test_keyboard_interrupt_at_import_propagates_and_changes_nothing(tmp_path, monkeypatch):
    _install_failure(tmp_path, monkeypatch, "ctrl_c", "raise KeyboardInterrupt\n", None)
    pm = get_plugin_manager()
    with pytest.raises(KeyboardInterrupt):
        pm.registry
    assert pm.records == {} and pm.pm.get_plugins() == set()  # nothing half-loaded
    monkeypatch.setenv("OQ_DISABLE_PLUGINS", "bad")  # discovery never finished: the env is read again
    assert "fp8_per_block_static" in pm.registry.keys.names()
    assert pm.records["bad"].status == "disabled"


def test_keyboard_interrupt_in_a_hook_propagates_and_the_next_access_rebuilds(tmp_path, monkeypatch):
    source = src(
        "import os\n@hookimpl\ndef oq_register_quant_keys(register):\n"
        "    register('bt_key', KEY)\n    if os.environ.get('BT_CTRL_C'):\n        raise KeyboardInterrupt\n"
    )
    _install_failure(tmp_path, monkeypatch, "ctrl_c_hook", source, None)
    monkeypatch.setenv("BT_CTRL_C", "1")
    pm = get_plugin_manager()
    with pytest.raises(KeyboardInterrupt):
        pm.registry
    monkeypatch.delenv("BT_CTRL_C")
    assert "bt_key" in pm.registry.keys.names() and pm.records["bad"].status == "loaded"


@pytest.mark.parametrize("strict", ["0", "1"])
def test_malformed_entry_points_file_is_reported_not_raised_untyped(tmp_path, monkeypatch, strict):
    install_fake_dist(tmp_path, monkeypatch, "oq-garbled", {"garbled": "oqb_garbled"}, {"oqb_garbled.py": src(KEYS_OK)})
    # importlib.metadata.entry_points() itself raises TypeError on this file, for every group
    (tmp_path / "oq_garbled-0.1.0.dist-info" / "entry_points.txt").write_text("[oqcore]\ngarbled line\n")
    monkeypatch.setenv("OQ_STRICT_PLUGINS", strict)
    pm = get_plugin_manager()
    culprits = ("distribution oq-garbled 0.1.0", "entry_points.txt is malformed", "TypeError")
    if strict == "1":
        with raises_naming(PluginError, *culprits):
            pm.registry
        return
    with pytest.warns(PluginWarning):
        reg = pm.registry
    record = pm.records["<oq-garbled>"]
    assert record.status == "failed" and all(c in record.error for c in culprits)
    assert "bt_key" not in reg.keys.names() and all(pm.records[n].status == "loaded" for n in BUILTINS)


# ----------------------------------------------------------------------------------------------
# Conflicts: (case id, distributions as (dist, entry points, files), culprits the message names)
# ----------------------------------------------------------------------------------------------

MODULE_CANDIDATES = src(
    "@hookimpl\ndef oq_backend_candidates(kind, weight_key):\n    return [Backend('torch', None)] if kind == 'linear' else []\n"
)
CONFLICTS = [
    (
        "entry_point_in_two_distributions",
        [("oq-a", {"dup": "oqc_a"}, {"oqc_a.py": src(KEYS_OK)}), ("oq-b", {"dup": "oqc_b"}, {"oqc_b.py": src(KEYS_OK)})],
        ["plugin entry point 'dup'", "oq-a 0.1.0 (oqc_a)", "oq-b 0.1.0 (oqc_b)", "none of them is loaded"],
    ),
    (
        "third_party_named_like_a_builtin",
        [("evil-fp8", {"fp8": "oqc_evil"}, {"oqc_evil.py": src(KEYS_OK)})],
        ["plugin entry point 'fp8'", "evil-fp8 0.1.0 (oqc_evil)", "oq-plugin-fp8 0.1.0 (oq_plugin_fp8.plugin)"],
    ),
    (
        "same_name_twice_in_one_distribution",
        [("oq-twice", [("twice", "oqc_t1"), ("twice", "oqc_t2")], {"oqc_t1.py": src(KEYS_OK), "oqc_t2.py": src(KEYS_OK)})],
        ["plugin entry point 'twice'", "oq-twice 0.1.0 (oqc_t1)", "oq-twice 0.1.0 (oqc_t2)"],
    ),
    (
        "key_name_of_a_builtin",
        [("oq-clash", {"clash": "oqc_key"}, {"oqc_key.py": src("@hookimpl\ndef oq_register_quant_keys(register):\n    register('mxfp8', KEY)\n")})],
        ["quantization key name 'mxfp8' is registered twice", "'mxfp8' (distribution oq-plugin-mxfp8", "'clash' (distribution oq-clash 0.1.0)"],
    ),
    (
        "alias_of_a_builtin_key_name",
        [("oq-clash", {"clash": "oqc_alias"}, {"oqc_alias.py": src("@hookimpl\ndef oq_register_quant_keys(register):\n    register('bt_key', KEY, aliases=('fp8_per_token',))\n")})],
        ["'fp8_per_token' is registered twice", "'fp8' (distribution oq-plugin-fp8", "'clash' (distribution oq-clash 0.1.0)"],
    ),
    (
        "builtin_key_under_another_name",
        [("oq-clash", {"clash": "oqc_samekey"}, {"oqc_samekey.py": src("from oq_plugin_fp8 import keys\n@hookimpl\ndef oq_register_quant_keys(register):\n    register('my_fp8', keys.kFp8StaticTensorSym)\n")})],
        ["is registered twice", "as 'fp8_per_tensor_static' by plugin 'fp8' (distribution oq-plugin-fp8", "as 'my_fp8' by plugin 'clash' (distribution oq-clash 0.1.0)"],
    ),
    (
        "shorthand_of_a_builtin",
        [("oq-clash", {"clash": "oqc_short"}, {"oqc_short.py": src(KEYS_OK + "@hookimpl\ndef oq_register_shorthands(register):\n    register('fp8_per_block', linear={'weight': 'bt_key'})\n")})],
        ["shorthand 'fp8_per_block' is registered twice", "'fp8' (distribution oq-plugin-fp8", "'clash' (distribution oq-clash 0.1.0)"],
    ),
    (
        "method_of_a_builtin",
        [("oq-clash", {"clash": "oqc_method"}, {"oqc_method.py": src("from oq_plugin_fp8 import keys\nclass M(OnlineLinearMethodBase):\n    weight_key = keys.kFp8StaticTensorSym\n@hookimpl\ndef oq_register_methods(register):\n    register('linear', 'fp8_per_tensor_static', M)\n")})],
        ["linear method for weight key 'fp8_per_tensor_static' is registered twice", "'fp8' (distribution oq-plugin-fp8", "'clash' (distribution oq-clash 0.1.0): M"],
    ),
    (
        "quantizer_of_a_builtin",
        [("oq-clash", {"clash": "oqc_quant"}, {"oqc_quant.py": src("@hookimpl\ndef oq_register_quantizers(register):\n    register('fp8_per_tensor_static', 'torch', q, q)\n")})],
        ["quantizer for 'fp8_per_tensor_static' on backend 'torch' is registered twice", "'fp8' (distribution oq-plugin-fp8", "'clash' (distribution oq-clash 0.1.0)"],
    ),
    (
        "backend_of_a_builtin",
        [("oq-clash", {"clash": "oqc_backend"}, {"oqc_backend.py": MODULE_CANDIDATES})],
        ["backend 'torch' (activation none) for linear 'fp8_per_tensor_static' is offered twice", "'fp8' (distribution oq-plugin-fp8", "'clash' (distribution oq-clash 0.1.0)"],
    ),
]


@pytest.mark.parametrize("case, dists, culprits", CONFLICTS, ids=[c[0] for c in CONFLICTS])
def test_conflict_is_fatal_on_every_access_and_names_both(tmp_path, monkeypatch, case, dists, culprits):
    for dist, eps, files in dists:
        install_fake_dist(tmp_path, monkeypatch, dist, eps, files)
    pm = get_plugin_manager()

    def touch():
        pm.registry
        pm.backend_candidates("linear", fp8_key())

    messages = []
    for _ in range(3):
        with raises_naming(PluginConflictError, *culprits) as e:
            touch()
        messages.append(str(e.value))
    assert len(set(messages)) == 1
    for strict in ("1", "0"):  # whatever the mode
        monkeypatch.setenv("OQ_STRICT_PLUGINS", strict)
        reset_plugin_manager()
        pm = get_plugin_manager()
        with raises_naming(PluginConflictError, *culprits):
            touch()
    # every side is reported (oq plugins lists both), the uninvolved plugins as loaded
    records = pm.plugin_records()
    involved = [r for r in records if r.status == "conflict"]
    assert len(involved) == 2 and all(r.error == messages[0] or culprits[0] in r.error for r in involved)
    assert all(r.status == "loaded" for r in records if r not in involved)
    assert isinstance(pm.fatal_error(), PluginConflictError)


def test_unregistering_one_side_ends_the_conflict(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, monkeypatch, "evil-fp8", {"fp8": "oqc_evil2"}, {"oqc_evil2.py": src(KEYS_OK)})
    pm = get_plugin_manager()
    with raises_naming(PluginConflictError, "evil-fp8", "oq-plugin-fp8"):
        pm.registry
    pm.unregister("fp8")  # both sides go: the user then registers the one they want
    from oq_plugin_fp8 import plugin

    pm.register(plugin, "fp8", distribution="oq-plugin-fp8")
    assert "fp8_per_block_static" in pm.registry.keys.names() and pm.fatal_error() is None


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["ture", "2", "enabled"])
def test_bad_strict_value_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv("OQ_STRICT_PLUGINS", value)
    for _ in range(2):
        with raises_naming(ConfigError, "OQ_STRICT_PLUGINS", repr(value)) as e:
            get_plugin_manager().registry
        assert e.value.field == "OQ_STRICT_PLUGINS"


@pytest.mark.parametrize("value, strict", [(" TRUE ", True), ("on", True), ("Off", False), ("", False), ("no", False)])
def test_strict_values(tmp_path, monkeypatch, value, strict):
    _install_failure(tmp_path, monkeypatch, f"strict_{abs(hash(value))}", "1/0\n", None)
    monkeypatch.setenv("OQ_STRICT_PLUGINS", value)
    pm = get_plugin_manager()
    if strict:
        with raises_naming(PluginError, "ZeroDivisionError"):
            pm.registry
    else:
        with pytest.warns(PluginWarning):
            pm.registry
        assert pm.records["bad"].status == "failed"


def test_allow_list_with_spaces_and_empty_entries(monkeypatch):
    monkeypatch.setenv("OQ_PLUGINS", " fp8 , ,int8,")
    pm = get_plugin_manager()
    names = pm.registry.keys.names()
    assert "fp8_per_block_static" in names and "int8_per_channel_static" in names and "mxfp8" not in names
    assert pm.records["mxfp8"].status == "not allowed"


@pytest.mark.parametrize("value", ["", "  ", " , "])
def test_blank_lists_mean_unset(monkeypatch, value):
    monkeypatch.setenv("OQ_PLUGINS", value)
    monkeypatch.setenv("OQ_DISABLE_PLUGINS", value)
    pm = get_plugin_manager()
    pm.registry
    assert {n: r.status for n, r in pm.records.items()} == dict.fromkeys(BUILTINS, "loaded")


def test_allow_list_naming_no_entry_point_is_a_config_error(monkeypatch):
    monkeypatch.setenv("OQ_PLUGINS", "fp8,fp9")
    for _ in range(2):
        with raises_naming(ConfigError, "OQ_PLUGINS", "'fp9'", "did you mean 'fp8'?", "installed: fp8, int8, mxfp4, mxfp8, nvfp4"):
            get_plugin_manager().registry


def test_disable_list_wins_and_unknown_names_warn(monkeypatch):
    monkeypatch.setenv("OQ_PLUGINS", "fp8,int8")
    monkeypatch.setenv("OQ_DISABLE_PLUGINS", "int8, int9")
    pm = get_plugin_manager()
    with pytest.warns(PluginWarning, match="OQ_DISABLE_PLUGINS names 'int9'.*did you mean 'int8'"):
        pm.registry
    assert pm.records["int8"].status == "disabled" and pm.records["fp8"].status == "loaded"


def test_a_disabled_name_is_no_conflict(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, monkeypatch, "evil-fp8", {"fp8": "oqc_evil3"}, {"oqc_evil3.py": "raise SystemExit\n"})
    monkeypatch.setenv("OQ_DISABLE_PLUGINS", "fp8")
    pm = get_plugin_manager()
    assert "int8_per_channel_static" in pm.registry.keys.names()
    assert sorted((r.distribution, r.status) for r in pm.plugin_records() if r.name == "fp8") == [
        ("evil-fp8", "disabled"),
        ("oq-plugin-fp8", "disabled"),
    ]


# ----------------------------------------------------------------------------------------------
# Direct registration, threads
# ----------------------------------------------------------------------------------------------


def test_register_refuses_a_taken_name_of_any_status(monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_PLUGINS", "mxfp8")
    from toy_scheme import ToyScheme

    pm = get_plugin_manager()
    with raises_naming(PluginConflictError, "'mxfp8' (distribution oq-plugin-mxfp8", "disabled"):
        pm.register(ToyScheme(), "mxfp8", distribution="my-app")


def test_unregister_unknown_name(monkeypatch):
    with raises_naming(PluginError, "no plugin named 'fp9'", "did you mean 'fp8'?"):
        get_plugin_manager().unregister("fp9")


def test_register_after_the_hook_returned_is_refused():
    kept = []

    class Keeper:
        @oqcore.hookimpl
        def oq_register_shorthands(self, register):
            kept.append(register)

    pm = get_plugin_manager()
    pm.register(Keeper(), "keeper")
    pm.registry
    with raises_naming(PluginError, "register() of hook oq_register_shorthands called after the hook returned"):
        kept[0]("late", linear={"weight": "fp8_per_tensor_static"})


def test_two_threads_first_touching_the_registry_load_once(tmp_path, monkeypatch):
    source = src(
        "import threading, time\nCALLS = []\ntime.sleep(0.2)  # widen the window in which both threads want the registry\n"
        "@hookimpl\ndef oq_register_quant_keys(register):\n    CALLS.append(threading.get_ident())\n    register('bt_key', KEY)\n"
    )
    install_fake_dist(tmp_path, monkeypatch, "oq-slow", {"slow": "oqb_slow"}, {"oqb_slow.py": source})
    pm = get_plugin_manager()
    barrier = threading.Barrier(2)
    got, errors = [], []

    def worker():
        barrier.wait()
        try:
            got.append(pm.registry)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    import oqb_slow

    assert errors == [] and len(got) == 2 and got[0] is got[1]
    assert len(oqb_slow.CALLS) == 1 and "bt_key" in got[0].keys.names()


def test_two_threads_both_see_a_conflict(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, monkeypatch, "evil-fp8", {"fp8": "oqc_evil4"}, {"oqc_evil4.py": src(KEYS_OK)})
    pm = get_plugin_manager()
    barrier = threading.Barrier(2)
    errors = []

    def worker():
        barrier.wait()
        try:
            pm.registry
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [type(e) for e in errors] == [PluginConflictError] * 2 and errors[0] is not errors[1]
    assert all("evil-fp8" in str(e) and "oq-plugin-fp8" in str(e) for e in errors)


def test_reset_forgets_a_fatal_error(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, monkeypatch, "evil-fp8", {"fp8": "oqc_evil5"}, {"oqc_evil5.py": src(KEYS_OK)})
    with raises_naming(PluginConflictError, "evil-fp8"):
        get_registry_now()
    monkeypatch.setenv("OQ_DISABLE_PLUGINS", "fp8")
    with raises_naming(PluginConflictError, "evil-fp8"):  # same manager: the env was read at discovery
        get_registry_now()
    reset_plugin_manager()
    assert "int8_per_channel_static" in get_registry_now().keys.names()


def get_registry_now():
    return oqcore.get_registry()
