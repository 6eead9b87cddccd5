"""Install a plugin distribution for a test without pip: a module plus a ``.dist-info`` folder with
METADATA and entry_points.txt on ``sys.path``, which is all importlib.metadata looks for. Discovery
in the tests therefore goes through the real ``importlib.metadata.entry_points`` path."""

import importlib
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path


def install_fake_dist(
    tmp_path: Path,
    monkeypatch,
    dist: str,
    entry_points: Mapping[str, str] | Iterable[tuple[str, str]],
    files: dict[str, str],
    version: str = "0.1.0",
) -> Path:
    """Create distribution ``dist`` ``version`` whose ``[oqcore]`` entry points are ``entry_points``
    (name -> "module:attr" or "module"; a list of pairs may repeat a name) and whose source
    ``files`` (relative path -> text) live in ``tmp_path``; put ``tmp_path`` on sys.path for this
    test. Several distributions may share one ``tmp_path``. Returns ``tmp_path``.

    Modules of the same name imported by an earlier test are dropped from ``sys.modules`` (now and
    after this test), so each test imports its own files.
    """
    for rel, text in files.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
        top = Path(rel).parts[0].removesuffix(".py")
        for mod in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            monkeypatch.delitem(sys.modules, mod)
        # forget it again after the test (setitem records "absent", restored at teardown)
        monkeypatch.setitem(sys.modules, top, None)
        del sys.modules[top]
    info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    pairs = entry_points.items() if isinstance(entry_points, Mapping) else entry_points
    eps = "\n".join(f"{k} = {v}" for k, v in pairs)
    (info / "entry_points.txt").write_text(f"[oqcore]\n{eps}\n")
    if str(tmp_path) not in sys.path:
        monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()  # finders cache directory listings; the files are new
    return tmp_path
