"""Battery: save_quantized on bad destinations, failing disks and models it cannot save.

Every failing case asserts: exactly :class:`oqcore.SaveError` naming the culprit (path or tensor),
the destination byte-for-byte as before (an earlier export stays loadable), no temporary folder
left behind, the source checkpoint untouched, and the model bit-identical at the same data_ptr.

How failures are produced (we run as root, which ignores permission bits):
- read-only file system: a read-only bind mount (``mount --bind -o ro``; skipped where mounting is
  not permitted), and an immutable folder (``chattr +i``; skipped where unsupported); an
  ``os.mkdir`` monkeypatched to raise ``PermissionError`` runs everywhere;
- full disk: ``os.write`` / ``shutil.copy2`` monkeypatched to raise ``OSError(ENOSPC)`` in-process
  (the real ``RLIMIT_FSIZE`` variant runs in a child process in ``tests/test_save_crash.py``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import oqcore
import oqcore.atomic as atomic
import oqcore.export as export
from oqcore.errors import SaveError
from tests.battery.util import assert_unchanged, raises_naming, snapshot


@pytest.fixture(autouse=True)
def _cpu_backends(monkeypatch):
    """Saving and loading do not depend on the backend; the CPU backends keep these tests fast
    (conftest turns Triton's interpreter on, which would otherwise be chosen and is slow)."""
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


def _tree(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    if folder.is_file():
        return {"": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.oq-"))


@pytest.fixture(scope="module")
def src(tiny_moe, tmp_path_factory) -> Path:
    """A private copy of a tiny Mixtral (the cases below must never be able to damage a shared fixture)."""
    out = tmp_path_factory.mktemp("src") / "mixtral"
    shutil.copytree(tiny_moe("mixtral"), out)
    (out / "tokenizer.json").write_text('{"tok": 1}')
    return out


@pytest.fixture(scope="module")
def model(src):
    return oqcore.load(src, "fp8_per_channel")


@pytest.fixture(scope="module")
def other(src):
    """The same model quantized another way: its export is the 'earlier export' saved over."""
    return oqcore.load(src, "mxfp8")


@pytest.fixture
def earlier(other, tmp_path) -> Path:
    return oqcore.save_quantized(other, tmp_path / "out")


@pytest.fixture
def guard(model, src):
    """Checks after a failing case: model and source unchanged."""
    snap, src_tree = snapshot(model), _tree(src)
    yield
    assert_unchanged(model, snap)
    assert _tree(src) == src_tree, "the source checkpoint changed"


def _fails(model, dest: Path, *culprits: str, exc=SaveError):
    before = _tree(dest)
    with raises_naming(exc, *culprits) as info:
        oqcore.save_quantized(model, dest)
    assert _tree(dest) == before, "the destination changed"
    if dest.parent.is_dir():
        assert _siblings(dest) == [], "a temporary folder was left behind"
    return info


# ---- destinations that must be refused --------------------------------------------------------


def test_into_the_source_folder(model, src, guard):
    info = _fails(model, src, str(src))
    assert "source" in str(info.value)


def test_into_the_source_folder_through_a_symlink(model, src, tmp_path, guard):
    link = tmp_path / "link"
    link.symlink_to(src)
    info = _fails(model, link, str(src))
    assert "source" in str(info.value) and link.is_symlink()


def test_into_a_subfolder_of_the_source(model, src, guard):
    _fails(model, src / "quantized", str(src), "inside")
    assert not (src / "quantized").exists()


def test_into_a_folder_containing_the_source(model, src, guard):
    info = _fails(model, src.parent, str(src.parent), str(src))
    assert "source" in str(info.value) and (src / "config.json").is_file()


NOT_EXPORTS = [
    ("user-files", "notes.txt", "precious"),
    ("broken-config", "config.json", "{not json"),
    ("other-tool", "config.json", '{"quantization_config": {"quant_method": "compressed-tensors"}}'),  # not written by oqcore
]


@pytest.mark.parametrize("file, text", [c[1:] for c in NOT_EXPORTS], ids=[c[0] for c in NOT_EXPORTS])
def test_over_a_folder_that_is_not_an_export(model, tmp_path, guard, file, text):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / file).write_text(text)
    _fails(model, dest, str(dest), "not an earlier oqcore export")
    assert (dest / file).read_text() == text


def test_onto_a_file(model, tmp_path, guard):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"data")
    _fails(model, dest, str(dest), "file")
    assert dest.read_bytes() == b"data"


def test_under_a_file(model, tmp_path, guard):
    f = tmp_path / "file.bin"
    f.write_bytes(b"data")
    _fails(model, f / "sub", str(f))
    assert f.read_bytes() == b"data"


def test_onto_a_dangling_symlink(model, tmp_path, guard):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere" / "deeper")
    before = os.readlink(link)
    with raises_naming(SaveError, "dangling"):
        oqcore.save_quantized(model, link)
    assert os.readlink(link) == before and not (tmp_path / "nowhere").exists()


def test_out_of_the_wrong_type(model, guard):
    with raises_naming(SaveError, "out", "int"):
        oqcore.save_quantized(model, 42)


# ---- failing disks ------------------------------------------------------------------------------


def test_permission_denied_creating_the_temporary_folder(model, earlier, monkeypatch, guard):
    """Portable stand-in for a read-only directory (root ignores mode bits): mkdir raises EACCES."""
    real = os.mkdir

    def deny(path, *a, **k):
        if ".oq-tmp-" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", deny)
    _fails(model, earlier, str(earlier), "Permission denied")


def test_permission_denied_creating_a_missing_parent(model, tmp_path, monkeypatch, guard):
    real = os.mkdir

    def deny(path, *a, **k):
        if Path(path).name == "new":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", deny)
    _fails(model, tmp_path / "new" / "deeper" / "out", str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_missing_parents_are_removed_again_on_failure(model, tmp_path, monkeypatch, guard):
    monkeypatch.setattr(export, "write_safetensors", _enospc_writer)
    _fails(model, tmp_path / "a" / "b" / "out", "No space left on device")
    assert list(tmp_path.iterdir()) == []


def _immutable(path: Path) -> bool:
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True) if shutil.which("chattr") else None
    return r is not None and r.returncode == 0


def test_immutable_parent_folder(model, earlier, guard):
    """A folder nobody (root included) may create entries in: ``chattr +i``."""
    parent = earlier.parent
    if not _immutable(parent):
        pytest.skip("chattr +i is not available here")
    try:
        _fails(model, earlier, str(earlier), "Operation not permitted")
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)
    assert oqcore.load(earlier).oq_state.config.to_dict()["linear"]["weight"] == "mxfp8"


def test_immutable_earlier_export(model, earlier, guard):
    """The earlier export itself cannot be moved: the swap fails and it stays in place, intact."""
    if not _immutable(earlier):
        pytest.skip("chattr +i is not available here")
    try:
        _fails(model, earlier, str(earlier))
    finally:
        subprocess.run(["chattr", "-i", str(earlier)], check=True)
    assert oqcore.load(earlier).oq_state.config.to_dict()["linear"]["weight"] == "mxfp8"


def test_read_only_file_system(model, earlier, guard):
    """A real read-only mount (EROFS): a read-only bind mount of the export's parent."""
    parent = earlier.parent
    r = subprocess.run(["mount", "--bind", "-o", "ro", str(parent), str(parent)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here: {r.stderr.decode().strip()}")
    try:
        with pytest.raises(OSError):
            (parent / "probe").write_text("x")
        _fails(model, earlier, str(earlier), "Read-only file system")
    finally:
        subprocess.run(["umount", str(parent)], check=True)


def _enospc_writer(path, tensors, metadata):
    """Writes a part of the tensor file, then the disk is full."""
    with open(path, "wb") as f:
        f.write(b"\0" * 1000)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_full_disk_while_writing_tensors(model, earlier, monkeypatch, guard):
    real = os.write
    written = [0]

    def write(fd, data):
        written[0] += 1
        if written[0] > 3:  # after the header and a couple of tensors
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    _fails(model, earlier, str(earlier), "No space left on device")
    assert written[0] > 3, "the simulated full disk was never hit"


def test_full_disk_while_copying_the_source_files(model, earlier, monkeypatch, guard):
    real = shutil.copy2

    def copy2(a, b, **k):
        if Path(b).name == "tokenizer.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(b))
        return real(a, b, **k)

    monkeypatch.setattr(shutil, "copy2", copy2)
    _fails(model, earlier, str(earlier), "tokenizer.json", "No space left on device")
    assert _saved_weight(earlier) == "mxfp8"  # the earlier export is intact and loads


def test_io_error_on_fsync(model, earlier, monkeypatch, guard):
    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    _fails(model, earlier, str(earlier), "Input/output error")
    monkeypatch.undo()
    assert _saved_weight(earlier) == "mxfp8"  # the earlier export is intact and loads


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_failed_swap_keeps_the_earlier_export(model, earlier, monkeypatch, guard, exchange):
    """The last step fails (e.g. EXDEV, EACCES): the earlier export is in place and loads."""
    real_rename = os.rename

    def fail(*a, **k):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(earlier))

    if exchange:
        monkeypatch.setattr(atomic, "exchange", fail)
    else:
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
        calls = [0]

        def rename(a, b):
            calls[0] += 1
            if calls[0] == 2:  # the new folder into place, after the earlier one was moved aside
                raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(b))
            return real_rename(a, b)

        monkeypatch.setattr(os, "rename", rename)
    _fails(model, earlier, str(earlier), "Permission denied")
    assert oqcore.load(earlier).oq_state.config.to_dict()["linear"]["weight"] == "mxfp8"


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_parent_not_durable_after_the_swap_undoes_it(model, earlier, monkeypatch, guard, exchange):
    """The new folder is in place but its parent cannot be fsynced: the swap is undone."""
    real = atomic.fsync_path

    def fsync_path(path):
        if Path(path) == earlier.parent:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real(path)

    monkeypatch.setattr(atomic, "fsync_path", fsync_path)
    if not exchange:
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    _fails(model, earlier, str(earlier), "Input/output error")
    assert _saved_weight(earlier) == "mxfp8"


def test_parent_not_durable_for_a_new_folder(model, tmp_path, monkeypatch, guard):
    real = atomic.fsync_path

    def fsync_path(path):
        if Path(path) == tmp_path:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real(path)

    monkeypatch.setattr(atomic, "fsync_path", fsync_path)
    _fails(model, tmp_path / "new", str(tmp_path / "new"), "Input/output error")
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_leaves_everything_as_it_was(model, earlier, monkeypatch, guard):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_safetensors", interrupt)
    before = _tree(earlier)
    with pytest.raises(KeyboardInterrupt):
        oqcore.save_quantized(model, earlier)
    assert _tree(earlier) == before and _siblings(earlier) == []


# ---- models that cannot be saved ----------------------------------------------------------------


def test_a_model_oqcore_did_not_produce(tmp_path):
    plain = nn.Linear(4, 4)
    with raises_naming(SaveError, str(tmp_path / "x"), "Linear"):
        oqcore.save_quantized(plain, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_tensors_on_the_meta_device(src, tmp_path):
    m = oqcore.load(src, "fp8_per_channel")
    m.model.norm.weight = nn.Parameter(torch.empty_like(m.model.norm.weight, device="meta"), requires_grad=False)
    with raises_naming(SaveError, "model.norm.weight", "meta"):
        oqcore.save_quantized(m, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_quantized_layer_whose_weight_was_replaced(src, tmp_path):
    m = oqcore.load(src, "fp8_per_channel")
    q = m.model.layers[0].self_attn.q_proj
    q.weight = nn.Parameter(q.weight.to(torch.bfloat16), requires_grad=False)
    with raises_naming(SaveError, "model.layers.0.self_attn.q_proj", "'weight'"):
        oqcore.save_quantized(m, tmp_path / "x")


def test_a_quantized_layer_taken_out_of_the_model(src, tmp_path):
    m = oqcore.load(src, "fp8_per_channel")
    m.model.layers[0].self_attn.q_proj = nn.Linear(m.config.hidden_size, m.config.hidden_size, bias=False)
    with raises_naming(SaveError, "model.layers.0.self_attn.q_proj"):
        oqcore.save_quantized(m, tmp_path / "x")


def test_a_buffer_safetensors_cannot_store(src, tmp_path):
    m = oqcore.load(src, "fp8_per_channel")
    m.model.norm.register_buffer("phase", torch.zeros(2, dtype=torch.complex128))
    with raises_naming(SaveError, "model.norm.phase", "complex128"):
        oqcore.save_quantized(m, tmp_path / "x")


def test_source_folder_gone(tiny_moe, tmp_path):
    gone = tmp_path / "gone"
    shutil.copytree(tiny_moe("mixtral"), gone)
    m = oqcore.load(gone, "fp8_per_channel")
    shutil.rmtree(gone)
    with raises_naming(SaveError, str(gone)):
        oqcore.save_quantized(m, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---- what must work ------------------------------------------------------------------------------


def _saved_weight(folder: Path) -> str:
    """The linear weight key of the export in ``folder``, read back by oqcore.load."""
    return oqcore.load(folder).oq_state.config.to_dict()["linear"]["weight"]


def test_over_an_earlier_export(model, earlier, guard):
    oqcore.save_quantized(model, earlier)
    assert _saved_weight(earlier) == "fp8_per_channel_static"
    assert _siblings(earlier) == []
    assert (earlier / "tokenizer.json").read_text() == '{"tok": 1}'


def test_over_an_earlier_export_without_rename_exchange(model, earlier, monkeypatch, guard):
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    oqcore.save_quantized(model, earlier)
    assert _saved_weight(earlier) == "fp8_per_channel_static"
    assert _siblings(earlier) == []


def test_into_an_empty_folder_and_a_new_nested_path(model, tmp_path, guard):
    (tmp_path / "empty").mkdir()
    oqcore.save_quantized(model, tmp_path / "empty")
    oqcore.save_quantized(model, tmp_path / "a" / "b" / "c")
    for d in (tmp_path / "empty", tmp_path / "a" / "b" / "c"):
        assert _saved_weight(d) == "fp8_per_channel_static"


def test_through_a_symlink_to_an_earlier_export(model, earlier, tmp_path, guard):
    link = tmp_path / "link"
    link.symlink_to(earlier)
    oqcore.save_quantized(model, link)
    assert link.is_symlink()
    assert _saved_weight(earlier) == "fp8_per_channel_static"


def test_stale_temporary_folders_are_cleaned_but_live_ones_kept(model, earlier, guard):
    """A killed save's temporary folder (no lock held) is removed by the next save; one a running
    save holds locked is left alone; an unrelated hidden folder is never touched."""
    stale = earlier.parent / f".{earlier.name}{atomic.TMP_TAG}dead0001"
    live = earlier.parent / f".{earlier.name}{atomic.TMP_TAG}live0001"
    unrelated = earlier.parent / f".{earlier.name}.mine"
    for d in (stale, live, unrelated):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        oqcore.save_quantized(model, earlier)
    finally:
        os.close(fd)
    assert not stale.exists() and live.exists() and unrelated.exists()
    assert _saved_weight(earlier) == "fp8_per_channel_static"


def test_stale_folders_do_not_confuse_load(other, earlier):
    stale = earlier.parent / f".{earlier.name}{atomic.TMP_TAG}dead0002"
    shutil.copytree(earlier, stale)
    (stale / "model.safetensors").write_bytes(b"garbage")
    assert _saved_weight(earlier) == "mxfp8"


def test_the_saved_file_is_standard_safetensors(model, tmp_path):
    from safetensors.torch import load_file

    out = oqcore.save_quantized(model, tmp_path / "x", format="oqcore")  # the model's own names
    tensors = load_file(str(out / "model.safetensors"))
    sd = model.state_dict()
    assert tensors.keys() <= sd.keys()
    for k, t in tensors.items():
        assert t.dtype == sd[k].dtype and torch.equal(t.view(torch.uint8), sd[k].detach().contiguous().view(torch.uint8)), k


def test_what_is_copied_from_the_source(tiny_moe, tmp_path):
    """Small files and module folders come along; no weights of any framework, no hidden folders."""
    src = tmp_path / "src"
    shutil.copytree(tiny_moe("mixtral"), src)
    for rel, data in {
        "tokenizer.json": "{}", "1_Pooling/config.json": "{}", "tf_model.h5": "w", "flax_model.msgpack": "w",
        "pytorch_model.bin": "w", "onnx/model.onnx": "w", ".cache/huggingface/x.lock": "",
    }.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(data)
    out = oqcore.save_quantized(oqcore.load(src, "fp8_per_channel"), tmp_path / "out")
    copied = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert copied == sorted(["1_Pooling/config.json", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"])


def test_check_destination_refuses_before_anything_is_written(src, tmp_path):
    """The pre-write checks on their own (the CLI runs them before a long load): same refusals,
    nothing created."""
    from oqcore.export import check_destination

    with raises_naming(SaveError, str(src), "loaded from"):
        check_destination(src, src)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with raises_naming(SaveError, str(mine), "not an earlier oqcore export"):
        check_destination(mine)
    assert check_destination(tmp_path / "new" / "deeper", src) == (tmp_path / "new" / "deeper").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
