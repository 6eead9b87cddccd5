"""Install a plugin distribution for a test without pip: a module plus a ``.dist-info`` folder with
METADATA and entry_points.txt on ``sys.path``, which is all importlib.metadata looks for."""

from pathlib import Path


def install_fake_dist(tmp_path: Path, monkeypatch, dist: str, entry_points: dict[str, str], files: dict[str, str]):
    """Create distribution ``dist`` 0.1.0 whose ``[oqcore]`` entry points are ``entry_points``
    (name -> "module:attr" or "module") and whose source ``files`` (relative path -> text) live in
    ``tmp_path``; put ``tmp_path`` on sys.path for this test."""
    for rel, text in files.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    info = tmp_path / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[oqcore]\n{eps}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
