"""Crash-safe file writing: never leave a half-written file or checkpoint.

The recipe is the classic one for POSIX file systems:

1. write the new content to a temporary file *in the same directory* as the
   target (so the final rename never crosses a file-system boundary),
2. ``flush`` + ``os.fsync`` so the bytes are on disk before the name is,
3. ``os.replace`` the temporary onto the target, which is atomic: a reader
   sees either the whole old file or the whole new one, never a mix,
4. ``fsync`` the directory (best effort) so the rename itself is durable.

If anything fails before step 3, the temporary is removed and the target is
left exactly as it was.

:func:`atomic_directory` extends the idea to a whole folder (a checkpoint:
weights, config, optimizer state, ...). See its docstring for the one short
window in which the folder is briefly absent when an old one is replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any

from numformer import jsonfile

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_directory",
    "is_complete",
    "complete_copies",
    "recover_directory",
]


def _read_umask() -> int:
    """The process umask. os.umask can only be read by setting it, so do it
    once at import (normally single-threaded) rather than on every write,
    where a concurrent thread could create a file under the wrong mask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_dir(path: str) -> None:
    """Flush a directory entry to disk (makes a rename durable).

    Best effort: some platforms (Windows) and file systems cannot open a
    directory for fsync; losing durability there is better than failing.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parent(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``path`` when the block succeeds.

    Usage::

        with atomic_open("model.safetensors", "wb") as f:
            f.write(header)
            f.write(data)

    The file object writes to ``<dir>/.<name>.<random>.tmp``; on a clean exit
    it is flushed, fsynced and renamed onto ``path``. On an exception (in the
    block, or in the flush/fsync/rename) the temporary is deleted, ``path``
    is untouched, and the exception propagates.

    Parameters
    ----------
    path : target file path; its directory must exist.
    mode : ``"wb"`` (default) or ``"w"`` (text); further keyword arguments
        (``encoding``, ``newline``) go to :func:`os.fdopen`.
    """
    if "w" not in mode or any(c in mode for c in "ra+x"):
        raise ValueError(f"atomic_open supports write modes 'w'/'wb' only, got {mode!r}")
    path = os.fspath(path)
    directory = _parent(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        f = os.fdopen(fd, mode, **kwargs)
    except BaseException:
        # fdopen failed (e.g. unknown encoding); it may or may not have
        # closed fd already, so a second close is allowed to fail.
        with contextlib.suppress(OSError):
            os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the permissions a normal
        # open() would (0666 minus the umask) so checkpoints stay shareable.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        # BaseException too: a Ctrl-C mid-write must not leave temp files.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (bytes-like)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Atomically replace ``path`` with ``text`` encoded as ``encoding``.

    Newlines are written as given (no platform translation), so the bytes on
    disk are the same on every OS.
    """
    with atomic_open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Atomically write ``obj`` as JSON (UTF-8, sorted keys, trailing newline).

    The object is serialized *before* the temporary file is created, so an
    unserializable object raises ``TypeError`` without touching the disk.
    """
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False, allow_nan=False)
    atomic_write_text(path, text + "\n")


def _fsync_tree(root: str) -> None:
    """fsync every regular file below ``root`` and the directories themselves."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fp = os.path.join(dirpath, name)
            if os.path.islink(fp) or not os.path.isfile(fp):
                continue
            fd = os.open(fp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_directory(final_path: str | os.PathLike[str], *, manifest: str | None = None) -> Iterator[str]:
    """Build a directory in a temporary location and move it into place.

    Usage::

        with atomic_directory("runs/ckpt", manifest="manifest.json") as tmp:
            save_file(weights, os.path.join(tmp, "model.safetensors"))
            atomic_write_json(os.path.join(tmp, "config.json"), config)

    Yields the path of a fresh empty directory created next to
    ``final_path`` (same parent, so renames are atomic). On a clean exit all
    files in it are fsynced and it is renamed to ``final_path``; on an
    exception it is removed and ``final_path`` is untouched.

    Replacing an existing directory: POSIX cannot atomically swap two
    non-empty directories, so this does

    1. ``rename(final_path, <aside>)``   -- old checkpoint kept, under a temp name
    2. ``rename(<tmp>, final_path)``     -- new checkpoint in place
    3. ``rmtree(<aside>)``

    Between 1 and 2 (two metadata operations, microseconds) ``final_path``
    does not exist. A crash exactly there leaves the complete old folder at
    ``<parent>/.<name>.old.<random>`` and the complete new one at
    ``<parent>/.<name>.<random>.tmp``. If step 2 fails with an exception, the
    old directory is renamed back; after a kill nothing runs, so readers call
    :func:`complete_copies` / :func:`recover_directory` to find the newest
    complete copy.

    ``manifest``: the name of a JSON file written *last* into the temporary
    folder, after every other file is fsynced: ``{"files": {relative path:
    size in bytes}, "created_ns": ...}``. A folder whose manifest exists and
    whose files all have the listed sizes is complete (:func:`is_complete`):
    a kill while the folder is being written leaves no manifest, and a kill
    while an aside copy is being deleted (step 3, which removes whole files)
    leaves a listed file missing.

    After a successful replace, leftovers of earlier interrupted replaces
    (``.<name>.old.*`` and ``.<name>.*.tmp`` siblings older than this one)
    are deleted: the folder now in place is newer than all of them.
    """
    final_path = os.path.abspath(os.fspath(final_path))
    parent = os.path.dirname(final_path)
    name = os.path.basename(final_path)
    if not name:
        raise ValueError(f"atomic_directory needs a directory name, got {final_path!r}")
    started_ns = time.time_ns()
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
    try:
        yield tmp
        _fsync_tree(tmp)
        if manifest is not None:
            _write_manifest(tmp, manifest)
        # mkdtemp creates 0700; use the permissions os.mkdir would.
        os.chmod(tmp, 0o777 & ~_UMASK)
        _move_into_place(tmp, final_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    _remove_stale_copies(final_path, started_ns)


def _write_manifest(folder: str, manifest: str) -> None:
    files = {}
    for dirpath, _dirnames, filenames in os.walk(folder):
        for fname in filenames:
            fp = os.path.join(dirpath, fname)
            rel = os.path.relpath(fp, folder).replace(os.sep, "/")
            if rel != manifest and os.path.isfile(fp) and not os.path.islink(fp):
                files[rel] = os.path.getsize(fp)
    atomic_write_json(os.path.join(folder, manifest), {"files": files, "created_ns": time.time_ns()})


def _read_manifest(folder: str, manifest: str) -> dict | None:
    try:
        m = jsonfile.load(os.path.join(folder, manifest))
    except (OSError, jsonfile.JSONFileError):          # absent, unreadable or not JSON: not complete
        return None
    if not (isinstance(m, dict) and isinstance(m.get("files"), dict) and isinstance(m.get("created_ns"), int)):
        return None
    return m


def is_complete(folder: str | os.PathLike[str], manifest: str) -> bool:
    """Whether ``folder`` holds a readable ``manifest`` and every file it lists, at the listed size."""
    folder = os.fspath(folder)
    m = _read_manifest(folder, manifest)
    if m is None:
        return False
    for rel, size in m["files"].items():
        fp = os.path.join(folder, *rel.split("/"))
        try:
            if os.path.getsize(fp) != size:
                return False
        except OSError:
            return False
    return True


def _sibling_copies(final_path: str) -> list[tuple[str, str]]:
    """(kind, path) of the ``.<name>.<random>.tmp`` ("new") and ``.<name>.old.<random>``
    ("old") folders that :func:`atomic_directory` leaves next to ``final_path`` when killed."""
    parent, name = os.path.split(os.path.abspath(os.fspath(final_path)))
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    found = []
    old_prefix, new_prefix = f".{name}.old.", f".{name}."
    for entry in sorted(entries):
        path = os.path.join(parent, entry)
        if entry.startswith(old_prefix) and not entry.endswith(".tmp"):
            kind = "old"
        elif entry.startswith(new_prefix) and entry.endswith(".tmp") and "." not in entry[len(new_prefix):-4]:
            kind = "new"
        else:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            found.append((kind, path))
    return found


def complete_copies(final_path: str | os.PathLike[str], manifest: str) -> list[str]:
    """Complete copies of ``final_path`` left by interrupted replaces, newest first.

    Newest = the latest manifest ``created_ns``; on a tie a new (``.tmp``)
    copy wins over an old (``.old.``) one.
    """
    ranked = []
    for kind, path in _sibling_copies(os.fspath(final_path)):
        if is_complete(path, manifest):
            m = _read_manifest(path, manifest)
            ranked.append((m["created_ns"], kind == "new", path))
    return [path for *_, path in sorted(ranked, reverse=True)]


def recover_directory(final_path: str | os.PathLike[str], manifest: str) -> str | None:
    """If ``final_path`` is missing, rename the newest complete copy into place.

    Returns the path of the copy that was moved (for the caller to report),
    or None when ``final_path`` exists or no complete copy was found. The
    other leftovers stay until the next :func:`atomic_directory` on this
    path removes them.
    """
    final_path = os.path.abspath(os.fspath(final_path))
    if os.path.lexists(final_path):
        return None
    for copy in complete_copies(final_path, manifest):
        try:
            os.rename(copy, final_path)
        except FileNotFoundError:          # another process moved it first
            continue
        _fsync_dir(os.path.dirname(final_path))
        return copy
    return None


def _remove_stale_copies(final_path: str, before_ns: int) -> None:
    """Delete leftovers of interrupted replaces of ``final_path`` made before ``before_ns``
    (a concurrent writer's newer temporary folder is left alone)."""
    for _kind, path in _sibling_copies(final_path):
        try:
            if os.stat(path).st_mtime_ns < before_ns:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _move_into_place(tmp: str, final_path: str) -> None:
    """Rename ``tmp`` to ``final_path``, replacing an existing directory."""
    if not os.path.lexists(final_path):
        os.rename(tmp, final_path)
        return
    if not os.path.isdir(final_path) or os.path.islink(final_path):
        # Refuse to clobber a file or a symlink with a directory: most likely
        # a user mistake (``--out`` pointing at a file).
        raise FileExistsError(f"{final_path} exists and is not a directory")
    parent, name = os.path.split(final_path)
    # mkdtemp reserves a unique name; the rename below needs it absent, so
    # remove the (empty) reservation first. The name stays unique in practice.
    aside = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old.")
    os.rmdir(aside)
    os.rename(final_path, aside)
    try:
        os.rename(tmp, final_path)
    except BaseException:
        os.rename(aside, final_path)  # put the old checkpoint back
        raise
    shutil.rmtree(aside, ignore_errors=True)
