"""Atomic file writes that never replace what they should not.

Every file xcnn writes (checkpoints, downloads, plots) goes through :func:`atomic_write`:

- the bytes go to a temp file in the target's directory, are fsynced, and the temp file is
  renamed over the target, so a reader (or a crash) sees the old file or the new one, never
  a mix;
- a symlink is followed: its *target* is replaced and the link stays a link;
- a directory, device, FIFO or socket at the path is refused (``IsADirectoryError`` /
  :class:`UnsafeTargetError`), never replaced; ``--save /dev/null`` run as root stays a device;
- the new file's mode follows the umask (``0o666 & ~umask``), as ``open()`` would give,
  not ``mkstemp``'s 0600;
- temp files are named ``.<name>.xcnn-tmp-<pid>``: one killed by SIGKILL mid-write is
  recognised and removed by the next write into that directory, once its pid is dead.

:func:`check_writable` runs the same checks up front, so a CLI can refuse a bad
``--save`` before an epoch of training.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["UnsafeTargetError", "atomic_write", "check_writable", "remove_stale", "resolve_target"]

_TMP_TAG = ".xcnn-tmp-"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.xcnn-tmp-(?P<pid>\d+)$")


class UnsafeTargetError(OSError):
    """The path names something a write must not replace (a device, FIFO or socket)."""


def resolve_target(path: str | os.PathLike[str]) -> Path:
    """The file a write to ``path`` should replace: symlinks followed, checked, not created.

    Raises
    ------
    FileNotFoundError
        ``path`` is empty.
    IsADirectoryError
        ``path`` is (or links to) a directory.
    UnsafeTargetError
        ``path`` is (or links to) a device, FIFO or socket.
    """
    text = os.fspath(path)
    if not text:
        raise FileNotFoundError(errno.ENOENT, "empty path", "''")
    # realpath follows every link, including a dangling one (whose target is then created).
    target = Path(os.path.realpath(text))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", text)
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
        raise UnsafeTargetError(errno.EEXIST, f"is {kind}; refusing to replace it", text)
    return target


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Raise now if :func:`atomic_write` to ``path`` would fail for its location.

    Checks what can be known before the work is done: the path is not empty, not a
    directory, device or FIFO, its directory exists and is writable. Returns the
    resolved target.
    """
    target = resolve_target(path)
    directory = target.parent
    if not directory.is_dir():
        raise FileNotFoundError(errno.ENOENT, "No such directory", str(directory))
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "directory is not writable", str(directory))
    if target.exists() and not os.access(target, os.W_OK) and os.geteuid() != 0:
        # Renaming over a read-only file would work, but the user marked it read-only.
        raise PermissionError(errno.EACCES, "file is read-only", os.fspath(path))
    return target


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Someone else's live process.
        return True
    return True


def remove_stale(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete xcnn temp files in ``directory`` left by processes that are no longer running.

    Returns the paths removed. Other files, and temp files of live processes, are left alone.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if m and entry.is_file(follow_symlinks=False) and not _pid_alive(int(m["pid"])):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _umask() -> int:
    mask = os.umask(0o022)  # The only portable way to read it is to set it.
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temp file for writing; on a clean exit, move it over ``path`` atomically.

    On any exception (including ``KeyboardInterrupt``) the temp file is removed and the
    old file is left as it was.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from xcnn.atomic import atomic_write
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "hello.txt"
    >>> with atomic_write(path) as fh:
    ...     _ = fh.write(b"hi")
    >>> path.read_bytes()
    b'hi'
    """
    target = resolve_target(path)
    directory = target.parent
    remove_stale(directory)
    tmp = directory / f".{target.name}{_TMP_TAG}{os.getpid()}"
    # O_EXCL|O_NOFOLLOW: never write through a link someone planted at the temp name.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # Ours from an earlier, interrupted write in this same process.
    try:
        # Opened inside the try: an interrupt right after the open still removes the file.
        fd = os.open(tmp, flags, 0o600)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories can't be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
