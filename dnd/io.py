"""Small file helpers shared by every stage: atomic writes, content hashes, file locks.

A run can be killed at any moment, so every file another run may read is written to a
temporary sibling and renamed into place (rename is atomic on POSIX and Windows). What
several processes must not do at once (use one run directory, compute one cache entry)
is guarded by :class:`FileLock`, which the operating system releases when its holder dies.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; finished files get the usual mode so a
# report folder can be served or shared.
_FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one.

    ``durable`` also flushes the file to the disk before it replaces the old one, so it
    survives a power cut. Files that are recomputed when damaged (caches, report
    thumbnails) pass False: a killed process still leaves the old file or the new one,
    and skipping the flush makes writing thousands of them several times faster.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """Atomically write UTF-8 text (``durable``: as for :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable object, independent of dict order.

    Used as cache keys: same inputs -> same key across runs and machines.
    """
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


def bytes_hash(data: bytes, length: int = 16) -> str:
    """Hex digest of raw bytes (e.g. an image's pixels), for content-addressed caches."""
    return hashlib.sha256(data).hexdigest()[:length]


# ---------------------------------------------------------------------------------------
# Advisory file locks
# ---------------------------------------------------------------------------------------

class LockBusy(BlockingIOError):
    """Another process holds the :class:`FileLock` at ``path``; ``holder`` is the info it
    wrote there ({} if unreadable)."""

    def __init__(self, path: Path, holder: dict[str, Any]):
        super().__init__(f"{path} is locked by another process ({holder or 'holder unknown'})")
        self.path, self.holder = path, holder


# Descriptors of the locks this process holds. A child made by fork() (DataLoader workers,
# multiprocessing) would share them, and an flock stays held while any copy is open: a
# killed parent's lock would then outlive it until its workers exit. Children close them.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)

if sys.platform == "win32":
    import msvcrt

    # Windows locks are mandatory: lock one byte far past the holder info so that other
    # processes can still read who holds it.
    _WIN_LOCK_OFFSET = 1 << 30

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EDEADLK):
                return False
            raise
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        # flock, not fcntl/lockf: an flock also excludes a second lock taken by the same
        # process (two describe() calls in one program), and closing some other descriptor
        # of the file does not silently drop it.
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _same_file(fd: int, path: Path) -> bool:
    """True if ``path`` still names the file open as ``fd`` (not removed or replaced)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def read_lock_holder(path: str | os.PathLike) -> dict[str, Any]:
    """The info the holder of the lock at ``path`` wrote; {} when absent or unreadable."""
    for _ in range(5):  # the holder truncates, then writes: retry a half-written file
        try:
            info = json.loads(Path(path).read_text(encoding="utf-8"))
            if isinstance(info, dict):
                return info
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    return {}


class FileLock:
    """An exclusive advisory lock on the file ``path`` (created if absent), for processes.

    The lock belongs to an open file, so the operating system drops it when the holder
    exits, crashes or is killed: a dead holder never leaves it stuck, and nothing needs
    cleaning up. The holder writes ``info`` (pid, host, ...; JSON) into the file, so the
    next process can say who holds it. Uses ``flock`` on POSIX (local disks and NFS) and
    ``msvcrt.locking`` on Windows (not exercised by the test suite). On a file system
    without locks it logs a warning and proceeds unlocked rather than refusing to run.
    """

    def __init__(self, path: str | os.PathLike, info: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.info = dict(info or {})
        self._fd: int | None = None
        self._pid: int | None = None
        self.locked = False  # False while not held, and when the file system has no locks

    def acquire(self, *, wait: bool = False, poll_s: float = 0.5,
                on_wait: Callable[[dict[str, Any]], None] | None = None) -> FileLock:
        """Take the lock. When another process holds it: raise :class:`LockBusy`, or with
        ``wait`` call ``on_wait(holder info)`` once and retry every ``poll_s`` seconds."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this FileLock")
        waited, unnamed = False, 0
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
            try:
                got = _try_lock(fd)
            except OSError as e:  # ENOLCK, EOPNOTSUPP: a file system without locks
                log.warning("cannot lock %s (%s); going on without a lock: make sure no other "
                            "process uses it at the same time", self.path, e)
                got = None
            except BaseException:
                os.close(fd)
                raise
            # A holder that removed the file after we opened it leaves us holding a lock on
            # a file nobody else can see: open the path again and lock that.
            if got is None or (got and _same_file(fd, self.path)):
                break
            os.close(fd)
            if got:
                continue
            holder = read_lock_holder(self.path)
            if not holder and unnamed < 3:  # it may have just let go (and emptied the file)
                unnamed += 1
                continue
            if not wait:
                raise LockBusy(self.path, holder)
            if on_wait is not None and not waited:
                on_wait(holder)
            waited = True
            time.sleep(poll_s)
        self._fd, self._pid, self.locked = fd, os.getpid(), bool(got)
        _HELD.add(fd)
        os.ftruncate(fd, 0)  # readers retry an empty or half-written file
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(self.info, sort_keys=True) + "\n").encode("utf-8"))
        return self

    def release(self) -> None:
        """Drop the lock (a no-op when not held, or in a forked child of the holder)."""
        if self._fd is None or self._pid != os.getpid():
            return
        fd, self._fd, self.locked = self._fd, None, False
        _HELD.discard(fd)
        try:
            os.ftruncate(fd, 0)  # not held any more: no stale holder info
            _unlock(fd)
        except OSError:
            pass  # closing the descriptor below releases it anyway
        finally:
            os.close(fd)

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
