"""Helpers for testing a scheme plugin the way users will meet it: as an installed distribution.

A plugin's tests should load it through its ``oqcore`` entry point, not by calling its hooks by
hand: that is what ``pip install`` gives users, and it runs the core's checks on every record the
plugin registers. :func:`install_distribution` writes the ``.dist-info`` metadata of a distribution
(name, version, entry points) into a folder, so a source checkout (or a test's temporary files) is
discovered exactly like an installed package once the folder is on ``sys.path``::

    @pytest.fixture
    def my_plugin(tmp_path, monkeypatch):
        site = oqcore.testing.install_distribution(tmp_path, "oq-plugin-mine", {"mine": "oq_plugin_mine.plugin"})
        monkeypatch.syspath_prepend(str(site))              # the dist-info
        monkeypatch.syspath_prepend(str(PACKAGE_ROOT))      # the package itself, if not installed
        oqcore.plugins.reset_plugin_manager()               # rediscover the entry points
        yield oqcore.get_plugin_manager()
        oqcore.plugins.reset_plugin_manager()

``examples/plugin-template/tests`` uses exactly this fixture.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from pathlib import Path

from oqcore.errors import ConfigError

ENTRY_POINT_GROUP = "oqcore"


def install_distribution(root: str | Path, dist: str, entry_points: Mapping[str, str], version: str = "0.1.0") -> Path:
    """Write ``<root>/<dist>-<version>.dist-info`` with ``METADATA`` and ``entry_points.txt`` declaring
    ``entry_points`` (entry-point name -> ``"module"`` or ``"module:attr"``) in the ``oqcore`` group;
    returns ``root`` (put it on ``sys.path``, then reset the plugin manager). Raises
    :class:`oqcore.ConfigError` for a distribution name or version that is not a valid one, or an
    entry point that is not ``name -> module path``."""
    if not isinstance(dist, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", dist):
        raise ConfigError(f"{dist!r} is not a distribution name", "dist")
    if not isinstance(version, str) or not re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", version):
        raise ConfigError(f"{version!r} is not a version", "version")
    if not isinstance(entry_points, Mapping) or not entry_points:
        raise ConfigError("give at least one entry point: {name: 'package.module'}", "entry_points")
    for name, target in entry_points.items():
        if not (isinstance(name, str) and isinstance(target, str) and re.fullmatch(r"[\w.]+(:[\w.]+)?", target)):
            raise ConfigError(f"entry point {name!r} = {target!r} is not name -> 'module[:attr]'", "entry_points")
    root = Path(root)
    info = root / f"{re.sub(r'[-.]+', '_', dist)}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")
    importlib.invalidate_caches()  # path finders cache directory listings; these files are new
    return root
