"""The testing recipe: load the plugin through its entry point, as an installed distribution.

Copy this fixture into your plugin's tests. It declares the distribution from the plugin's own
pyproject.toml in a temporary dist-info (no ``pip install`` needed), puts the package on the path
and makes oqcore rediscover its plugins, so every test sees the plugin as users will.
"""

import tomllib
from pathlib import Path

import pytest

import oqcore
import oqcore.plugins
from oqcore.testing import install_distribution

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    site = install_distribution(tmp_path, meta["name"], meta["entry-points"]["oqcore"], meta["version"])
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("OQ_STRICT_PLUGINS", "1")  # a failing plugin is an error in tests, not a warning
    oqcore.plugins.reset_plugin_manager()
    pm = oqcore.get_plugin_manager()
    pm.registry  # discovers and loads the entry points (strict: raises if the plugin fails)
    assert pm.records["int4_template"].status == "loaded", pm.records["int4_template"].error
    yield pm
    oqcore.plugins.reset_plugin_manager()
