"""Writing a whole folder atomically: readers see the old folder or the new one, never a mix.

The new folder is written as a hidden sibling (``.<name>.oq-tmp-<random>``, same parent, so same
file system), every file and folder in it is fsynced, then it is renamed into place and the parent
is fsynced. When the destination already exists it is swapped out:

- Linux ``renameat2(RENAME_EXCHANGE)`` (ext4, xfs, btrfs, tmpfs, ...) swaps the two folders in one
  atomic step; the old folder, now under the temporary name, is deleted afterwards. A crash at any
  moment leaves the destination holding the old or the new folder.
- Elsewhere (another OS, a file system without the flag) two renames: destination to
  ``.<name>.oq-old-<random>``, then the new folder into place. A crash between the two leaves no
  destination (the old folder is intact under the ``oq-old`` name); that window is two metadata
  operations long.

A save in progress holds an exclusive ``flock`` on its temporary folder. Leftovers of a killed save
(no live lock) are deleted by the next write to the same destination; ``oq-old`` leftovers only
once the destination exists again, so the last complete copy is never the one deleted.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks, so leftovers are never deleted
    fcntl = None

from oqcore.errors import SaveError

TMP_TAG = ".oq-tmp-"
OLD_TAG = ".oq-old-"
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2

_STAGE_HOOK: Callable[[str], None] | None = None
"""Test hook: called with the name of each stage of a write (crash tests kill the process there)."""


def stage(name: str) -> None:
    """Mark a stage of a folder write (``temp_created``, ``synced``, ``old_moved``, ``swapped``...)."""
    if _STAGE_HOOK is not None:
        _STAGE_HOOK(name)


@functools.cache
def _renameat2_fn():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; ``False`` when the C library, kernel or file system does not
    support the call or flag (the caller falls back), :class:`OSError` for a real failure."""
    fn = _renameat2_fn()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap folders ``a`` and ``b``; ``False`` if not supported here."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def fsync_path(path: Path) -> None:
    """fsync one file or folder (folders: their entries become durable)."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder bottom-up, ``root`` last."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def _lock(folder: Path) -> int | None:
    """An fd holding an exclusive non-blocking ``flock`` on ``folder``; ``None`` if another process
    holds it. Raises :class:`OSError` when the folder cannot be opened or locks are unsupported."""
    if fcntl is None:
        raise OSError(errno.ENOTSUP, "file locks are not supported here", str(folder))
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


def _prefix(dest: Path) -> str:
    return "." + dest.name[:200]  # leaves room for the tag and random part within NAME_MAX (255)


def clean_stale(dest: Path) -> list[Path]:
    """Delete leftovers of killed writes to ``dest`` (temporary folders nobody holds a lock on;
    ``oq-old`` folders only when ``dest`` exists). Returns what was deleted; never raises."""
    removed = []
    parent, prefix = dest.parent, _prefix(dest)
    try:
        siblings = list(parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
            continue
        tail = p.name[len(prefix) :]
        if tail.startswith(TMP_TAG):
            try:
                fd = _lock(p)
            except OSError:
                continue  # cannot tell whether a save is still running: leave it
            if fd is None:
                continue  # a live save
            try:
                shutil.rmtree(p, ignore_errors=True)
            finally:
                os.close(fd)
            removed.append(p)
        elif tail.startswith(OLD_TAG) and dest.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _fail(dest: Path, e: OSError, doing: str) -> SaveError:
    where = e.filename if e.filename else dest
    return SaveError(f"cannot save to {dest}: {doing} {where}: {e.strerror or e}")


def write_folder(dest: Path, fill: Callable[[Path], None], *, replaceable: Callable[[Path], bool]) -> Path:
    """Create folder ``dest`` atomically with the contents ``fill(tmp)`` writes into an empty folder.

    ``dest`` must be absolute. An existing ``dest`` is replaced only if it is an empty folder or
    ``replaceable(dest)`` says so (else :class:`oqcore.SaveError` naming it, nothing written); a file
    at ``dest`` is a :class:`oqcore.SaveError`. Missing parent folders are created (and removed
    again on failure). Any :class:`OSError` (read-only or full disk, permissions) becomes a
    :class:`oqcore.SaveError` naming ``dest`` and the path at fault; other exceptions propagate.
    Either way ``dest`` is left exactly as it was and the temporary folder is removed.
    """
    if dest.name in ("", ".", ".."):
        raise SaveError(f"cannot save to {dest}: not a folder name")
    if dest.is_symlink() and not dest.exists():
        raise SaveError(f"cannot save to {dest}: it is a dangling symbolic link")
    if dest.exists():
        if not dest.is_dir():
            raise SaveError(f"cannot save to {dest}: a file (not a folder) is in the way; remove it or choose another path")
        try:
            empty = not any(dest.iterdir())
        except OSError as e:
            raise _fail(dest, e, "cannot list") from None
        if not empty and not replaceable(dest):
            raise SaveError(
                f"cannot save to {dest}: the folder exists and is not an earlier oqcore export; "
                "refusing to replace it (choose a new or empty folder, or delete it yourself)"
            )
    created = _make_parents(dest.parent, dest)
    clean_stale(dest)
    tmp = dest.parent / f"{_prefix(dest)}{TMP_TAG}{secrets.token_hex(4)}"
    lock = None
    try:
        try:
            os.mkdir(tmp, 0o755)
        except OSError as e:
            raise _fail(dest, e, "cannot create the temporary folder") from None
        try:
            lock = _lock(tmp)
        except OSError:
            lock = None  # no locks here: clean_stale then never deletes this folder
        stage("temp_created")
        try:
            fill(tmp)
            fsync_tree(tmp)
        except OSError as e:
            raise _fail(dest, e, "cannot write") from None
        stage("synced")
        old = _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        if lock is not None:
            os.close(lock)
        raise
    if lock is not None:
        os.close(lock)
    stage("swapped")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # if this fails, the next write's clean_stale retries
    clean_stale(dest)  # an ``oq-old`` left by a write killed in the two-rename window: now replaced
    return dest


def _durable(parent: Path, undo: Callable[[], object]) -> None:
    """fsync ``parent`` after a rename in it; on failure run ``undo`` and re-raise."""
    try:
        fsync_path(parent)
    except OSError:
        undo()
        raise


def _make_parents(parent: Path, dest: Path) -> list[Path]:
    """Create ``parent`` and missing ancestors; returns the created ones, deepest first."""
    missing = []
    p = parent
    while not p.exists() and not p.is_symlink():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise SaveError(f"cannot save to {dest}: {p} is a file, not a folder")
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            for c in reversed(created):
                try:
                    c.rmdir()
                except OSError:
                    break
            raise _fail(dest, e, "cannot create the folder") from None
        created.append(d)
    return list(reversed(created))


def _swap_in(tmp: Path, dest: Path) -> Path | None:
    """Put ``tmp`` at ``dest``; returns where the replaced folder now is (to delete), or ``None``.

    If the parent folder cannot be fsynced after the swap (the new entry would not be durable), the
    swap is undone before the error is reported: a failure always leaves ``dest`` as it was."""
    try:
        if dest.is_dir():
            if exchange(tmp, dest):
                _durable(dest.parent, undo=lambda: exchange(tmp, dest))
                return tmp
            old = dest.parent / f"{_prefix(dest)}{OLD_TAG}{secrets.token_hex(4)}"
            os.rename(dest, old)
            stage("old_moved")
            try:
                os.rename(tmp, dest)
            except OSError:
                os.rename(old, dest)  # put the earlier folder back before reporting
                raise
            _durable(dest.parent, undo=lambda: (os.rename(dest, tmp), os.rename(old, dest)))
            return old
        if not _renameat2(tmp, dest, _RENAME_NOREPLACE):
            os.rename(tmp, dest)
        _durable(dest.parent, undo=lambda: os.rename(dest, tmp))
        return None
    except OSError as e:
        if e.errno == errno.EEXIST or e.errno == errno.ENOTEMPTY:
            raise SaveError(f"cannot save to {dest}: something else created it while saving; nothing was replaced") from None
        raise _fail(dest, e, "cannot move the new folder into place at") from None
