"""Plugin discovery through entry points: lazy loading, broken plugins, allow/block lists, strict
mode, conflicts naming both distributions, check_pending, and a third-party scheme used by plan()
exactly like a built-in."""

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import oqcore
from oqcore import PluginConflictError, PluginError
from oqcore.plugins import get_plugin_manager
from fakedist import install_fake_dist

BUILTINS = {"fp8", "mxfp8", "int8"}

THIRD_PARTY = textwrap.dedent(
    '''
    import torch
    from oqcore import Backend, GroupShape, OnlineLinearMethodBase, QuantKey, ScaleDesc, hookimpl

    KEY = QuantKey(torch.uint8, ScaleDesc(torch.float32, True, GroupShape(1, 16)), symmetric=False)

    class Uint8Group16(OnlineLinearMethodBase):
        weight_key = KEY

    def quantize(w, options):
        g = w.float().reshape(*w.shape[:-1], -1, 16)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        s = ((hi - lo) / 255).clamp_min(torch.finfo(torch.float32).eps)
        q = ((g - lo) / s).round().clamp(0, 255).to(torch.uint8)
        return q.reshape(w.shape), torch.cat([s, lo], -1)

    def dequantize(q, s, dtype, options):
        g = q.float().reshape(*q.shape[:-1], -1, 16)
        return (g * s[..., :1] + s[..., 1:]).reshape(q.shape).to(dtype)

    @hookimpl
    def oq_register_quant_keys(register):
        register("uint8_g16", KEY)

    @hookimpl
    def oq_register_methods(register):
        register("linear", KEY, Uint8Group16)

    @hookimpl
    def oq_register_quantizers(register):
        register(KEY, "torch", quantize, dequantize)

    @hookimpl
    def oq_backend_candidates(kind, weight_key):
        return [Backend("torch", None)] if (kind, weight_key) == ("linear", KEY) else []
    '''
)


def test_builtins_are_discovered_through_entry_points():
    pm = get_plugin_manager()
    assert pm.records == {}  # lazy: nothing loaded before first use
    reg = pm.registry
    assert {n for n, r in pm.records.items() if r.status == "loaded"} >= BUILTINS
    assert {r.distribution for n, r in pm.records.items() if n in BUILTINS} == {
        "oq-plugin-fp8",
        "oq-plugin-mxfp8",
        "oq-plugin-int8",
    }
    assert {"fp8_per_block", "fp8_per_tensor", "fp8_per_channel", "mxfp8", "int8_per_channel_weight_only"} <= set(
        reg.shorthands
    )


def test_third_party_plugin_is_used_by_plan_like_a_builtin(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, monkeypatch, "oq-plugin-uint8", {"uint8": "oq_uint8"}, {"oq_uint8.py": THIRD_PARTY})
    pm = get_plugin_manager()
    pm.registry
    assert pm.records["uint8"].distribution == "oq-plugin-uint8"
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 8))
    p = oqcore.plan(model, {"linear": "uint8_g16"})
    assert [(lp.name, lp.backend.name, lp.bound.method_cls.__name__) for lp in p.quantized] == [
        ("0", "torch", "Uint8Group16"),
        ("2", "torch", "Uint8Group16"),
    ]
    assert p.quantized[0].backend.plugin == "uint8"
    w = torch.randn(48, 32)
    qt = oqcore.quantize_tensor(w, "uint8_g16")
    assert qt.qdata.dtype == torch.uint8
    from oqcore.metrics import sqnr

    assert sqnr(w, qt.dequantize(torch.float32)) > 40


def test_broken_entry_point_does_not_take_the_others_down(tmp_path, monkeypatch):
    install_fake_dist(
        tmp_path,
        monkeypatch,
        "oq-plugin-broken",
        {"broken": "oq_broken", "missing": "oq_not_there"},
        {"oq_broken.py": "raise RuntimeError('boom at import')\n"},
    )
    pm = get_plugin_manager()
    with pytest.warns(oqcore.plugins.PluginWarning, match="; continuing without it") as warned:
        reg = pm.registry
    assert sorted(str(w.message).split(" (distribution")[0] for w in warned) == ["plugin 'broken'", "plugin 'missing'"]
    assert pm.records["broken"].status == "failed" and pm.records["broken"].hook == "import"
    assert pm.records["broken"].error == (
        "plugin 'broken' (distribution oq-plugin-broken 0.1.0) failed at import of 'oq_broken': RuntimeError: boom at import"
    )
    assert pm.records["missing"].status == "failed"
    assert "No module named 'oq_not_there'" in pm.records["missing"].error
    assert "fp8_per_block_static" in reg.keys.names()


def test_strict_mode_makes_a_broken_plugin_fatal(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, monkeypatch, "oq-plugin-broken", {"broken": "oq_broken"}, {"oq_broken.py": "1/0\n"})
    monkeypatch.setenv("OQ_STRICT_PLUGINS", "1")
    for _ in range(2):  # fatal on every access, not only the first
        with pytest.raises(
            PluginError, match=r"plugin 'broken' \(distribution oq-plugin-broken 0.1.0\) failed at import of 'oq_broken': ZeroDivisionError"
        ) as e:
            get_plugin_manager().registry
        assert isinstance(e.value.__cause__, ZeroDivisionError)


def test_a_plugin_failing_in_a_later_hook_keeps_nothing(tmp_path, monkeypatch):
    src = THIRD_PARTY.replace("register(KEY, \"torch\", quantize, dequantize)", "raise ValueError('bad quantizer')")
    install_fake_dist(tmp_path, monkeypatch, "oq-plugin-uint8", {"uint8": "oq_uint8_bad"}, {"oq_uint8_bad.py": src})
    pm = get_plugin_manager()
    with pytest.warns(oqcore.plugins.PluginWarning):
        reg = pm.registry
    assert pm.records["uint8"].status == "failed" and pm.records["uint8"].hook == "oq_register_quantizers"
    assert pm.records["uint8"].error == (
        "plugin 'uint8' (distribution oq-plugin-uint8 0.1.0) failed in hook oq_register_quantizers: ValueError: bad quantizer"
    )
    assert "uint8_g16" not in reg.keys.names()
    assert all(e.plugin != "uint8" for e in reg.methods.values())


def test_allow_list_and_disable_list(monkeypatch):
    monkeypatch.setenv("OQ_PLUGINS", "fp8")
    pm = get_plugin_manager()
    names = pm.registry.keys.names()
    assert "fp8_per_block_static" in names and "mxfp8" not in names
    assert pm.records["mxfp8"].status == "not allowed"
    oqcore.plugins.reset_plugin_manager()
    monkeypatch.delenv("OQ_PLUGINS")
    monkeypatch.setenv("OQ_DISABLE_PLUGINS", "int8, mxfp8")
    pm = get_plugin_manager()
    assert "int8_per_channel_static" not in pm.registry.keys.names()
    assert pm.records["int8"].status == "disabled"


def test_same_key_name_from_two_distributions_names_both(tmp_path, monkeypatch):
    clash = textwrap.dedent(
        '''
        import torch
        from oqcore import GroupShape, QuantKey, ScaleDesc, hookimpl

        @hookimpl
        def oq_register_quant_keys(register):
            register("mxfp8", QuantKey(torch.uint8, ScaleDesc(torch.float32, True, GroupShape(1, 32))))
        '''
    )
    install_fake_dist(tmp_path, monkeypatch, "oq-plugin-clash", {"clash": "oq_clash"}, {"oq_clash.py": clash})
    pm = get_plugin_manager()
    for _ in range(2):
        with pytest.raises(PluginConflictError) as e:
            pm.registry
        msg = str(e.value)
        assert "quantization key name 'mxfp8' is registered twice" in msg and "oq_register_quant_keys" in msg
        assert "'mxfp8' (distribution oq-plugin-mxfp8 0.1.0)" in msg and "'clash' (distribution oq-plugin-clash 0.1.0)" in msg
    assert pm.records["mxfp8"].status == pm.records["clash"].status == "conflict"
    pm.unregister("clash")  # the plugin set changed: the conflict is gone, mxfp8 is back
    assert "mxfp8" in pm.registry.keys.names() and pm.records["mxfp8"].status == "loaded"


def test_same_key_under_two_names_is_a_conflict():
    from toy_scheme import TOY

    class Dup:
        @oqcore.hookimpl
        def oq_register_quant_keys(self, register):
            register("toy_again", TOY)

    from toy_scheme import register_toy

    pm = register_toy()
    pm.register(Dup(), "dup")
    with pytest.raises(PluginConflictError, match="weight key int4.* is registered twice, as 'toy_int4' by plugin 'toy'"):
        pm.registry


def test_method_and_shorthand_conflicts():
    from toy_scheme import ToyScheme, register_toy

    pm = register_toy()

    class Again(ToyScheme):
        oq_register_quant_keys = None  # keys come from the first toy; re-register the rest

    pm.register(Again(), "again")
    with pytest.raises(PluginConflictError, match="shorthand 'toy' is registered twice: by plugin 'toy'.*and by plugin 'again'"):
        pm.registry


def test_registering_a_plugin_name_twice():
    from toy_scheme import ToyScheme, register_toy

    pm = register_toy()
    with pytest.raises(PluginConflictError, match=r"cannot register plugin 'toy' \(distribution toy\): the name 'toy' is already taken by plugin 'toy' \(distribution toy\), loaded"):
        pm.register(ToyScheme(), "toy")


def test_check_pending_catches_hook_typos():
    class Typo:
        @oqcore.hookimpl
        def oq_register_method(self, register):  # missing "s"
            pass

    pm = get_plugin_manager()
    with pytest.raises(PluginError, match="'oq_register_method', which is not an oqcore hook \\(did you mean 'oq_register_methods'\\?\\)"):
        pm.register(Typo(), "typo")
    assert "typo" not in pm.records
    pm.pm.register(Typo(), "typo")  # around oqcore's checks: check_pending still finds it
    with pytest.raises(PluginError, match="plugin 'typo' .*'oq_register_method'"):
        pm.check_pending()


def test_unregister_removes_a_scheme():
    from toy_scheme import register_toy

    pm = register_toy()
    assert "toy_int4" in pm.registry.keys.names()
    pm.unregister("toy")
    assert "toy_int4" not in pm.registry.keys.names()


def test_bad_registrations_are_reported_per_plugin():
    from oqcore import OnlineLinearMethodBase

    class NotAMethod:
        pass

    class Bad:
        @oqcore.hookimpl
        def oq_register_methods(self, register):
            register("linear", "fp8_per_block_static", NotAMethod)

    class BadKind:
        @oqcore.hookimpl
        def oq_register_methods(self, register):
            register("attention", "fp8_per_block_static", OnlineLinearMethodBase)

    class BadBackend:
        @oqcore.hookimpl
        def oq_backend_candidates(self, kind, weight_key):
            return ["torch"]

    pm = get_plugin_manager()
    pm.register(Bad(), "bad")
    pm.register(BadKind(), "badkind")
    pm.register(BadBackend(), "badbackend")
    with pytest.warns(oqcore.plugins.PluginWarning):
        pm.registry
    assert "in hook oq_register_methods: " in pm.records["bad"].error
    assert "must subclass OnlineLinearMethodBase" in pm.records["bad"].error
    assert "unknown layer kind 'attention'; kinds: linear, moe" in pm.records["badkind"].error
    with pytest.warns(oqcore.plugins.PluginWarning):
        got = pm.backend_candidates("linear", oqcore.quant_key("fp8_per_block_static"))
    assert got and all(b.plugin == "fp8" for b in got)
    assert pm.records["badbackend"].error == (
        "plugin 'badbackend' (distribution badbackend) failed in hook oq_backend_candidates(kind='linear', "
        "weight_key=fp8_per_block_static): returned str 'torch' at index 0, not an oqcore.Backend"
    )


def test_every_hook_is_documented_and_exercised():
    from oqcore import hookspecs

    specs = {n for n in dir(hookspecs) if n.startswith("oq_")}
    assert specs == {
        "oq_register_quant_keys",
        "oq_register_shorthands",
        "oq_register_methods",
        "oq_register_quantizers",
        "oq_backend_candidates",
        "oq_register_schemes",
    }
    assert all(len(getattr(hookspecs, n).__doc__) > 100 for n in specs)
    # each hook has a test: the v1 hooks through the toy scheme (this file, test_config,
    # test_planning), oq_register_schemes through the packed toy4 plugin (test_toy4_scheme.py)
    from toy_scheme import ToyScheme

    toy4 = (Path(__file__).parent / "toy4_plugin.py").read_text()
    exercised = {n for n in dir(ToyScheme) if n.startswith("oq_")} | {n for n in specs if f"def {n}(" in toy4}
    assert specs <= exercised


def test_a_plugin_failing_in_backend_candidates_keeps_nothing(tmp_path, monkeypatch):
    src = THIRD_PARTY.replace(
        "return [Backend(\"torch\", None)] if (kind, weight_key) == (\"linear\", KEY) else []", "raise RuntimeError('no backends today')"
    )
    assert "no backends today" in src
    install_fake_dist(tmp_path, monkeypatch, "oq-plugin-uint8", {"uint8": "oq_uint8_nob"}, {"oq_uint8_nob.py": src})
    pm = get_plugin_manager()
    key = oqcore.quant_key("uint8_g16")  # its keys are there until its backend hook fails
    with pytest.warns(oqcore.plugins.PluginWarning, match="no backends today"):
        assert pm.backend_candidates("linear", key) == []
    record = pm.records["uint8"]
    assert (record.status, record.hook) == ("failed", "oq_backend_candidates")
    assert "uint8_g16" not in pm.registry.keys.names()  # then none of it stays
    assert all(e.plugin != "uint8" for e in pm.registry.methods.values())


def test_plugin_records_and_fatal_error_for_oq_plugins(tmp_path, monkeypatch):
    """What `oq plugins` shows: every record (both sides of a conflict) and the fatal error, without raising."""
    install_fake_dist(tmp_path, monkeypatch, "evil-fp8", {"fp8": "oq_evil_fp8"}, {"oq_evil_fp8.py": THIRD_PARTY})
    pm = get_plugin_manager()
    rows = [(r.name, r.distribution, r.status) for r in pm.plugin_records()]
    assert rows == [
        ("fp8", "evil-fp8", "conflict"),
        ("fp8", "oq-plugin-fp8", "conflict"),
        ("int8", "oq-plugin-int8", "loaded"),
        ("mxfp4", "oq-plugin-mxfp4", "loaded"),
        ("mxfp8", "oq-plugin-mxfp8", "loaded"),
        ("nvfp4", "oq-plugin-nvfp4", "loaded"),
    ]
    err = pm.fatal_error()
    assert isinstance(err, PluginConflictError) and "evil-fp8" in str(err) and "oq-plugin-fp8" in str(err)
    assert pm.fatal_error() is not err  # a fresh instance each time


def test_two_entry_points_naming_one_module(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, monkeypatch, "oq-plugin-uint8", {"uint8": "oq_uint8_two", "uint8b": "oq_uint8_two"}, {"oq_uint8_two.py": THIRD_PARTY})
    pm = get_plugin_manager()
    with pytest.warns(oqcore.plugins.PluginWarning):
        reg = pm.registry
    assert pm.records["uint8"].status == "loaded" and "uint8_g16" in reg.keys.names()
    assert pm.records["uint8b"].status == "failed"
    assert pm.records["uint8b"].error == (
        "plugin 'uint8b' (distribution oq-plugin-uint8 0.1.0) failed at registration: entry point uint8b = "
        "'oq_uint8_two' is the same object as plugin 'uint8' (distribution oq-plugin-uint8 0.1.0); one plugin object has one name"
    )
