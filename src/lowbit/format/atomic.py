"""Atomic file writes: the one writer of every file lowbit makes (.lowbit files, checkpoints, logs, ONNX, configs).

``write_atomic(path, data)`` writes through a temporary file in the same directory, fsyncs it, renames it
into place and fsyncs the directory, so a failure or a kill leaves the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import signal
import socket
import stat
import threading
import time
from typing import Any, Iterator

from ..errors import ConfigError

#: a temporary file older than this is stale whoever wrote it (seconds)
STALE_TEMP_SECONDS = 3600


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsync and ``os.replace``.

    A failure or a kill at any point leaves ``path`` as it was (absent or the old file, never a mix). Missing
    parent directories are created. A new file gets ``0o666 & ~umask``; an overwritten file keeps its mode.

    The temporary file is ``.{name}.{pid}.{tag}.{random}.tmp`` (``tag``: this host, boot and pid namespace).
    Every write first removes the temporary files of the same target whose writer is gone (see
    :func:`_is_stale`), and removes its own on any exception. In the main thread, SIGTERM, SIGHUP and SIGINT
    left at their default action raise while the temporary file exists, so it is removed; then the process
    dies of the signal as it would have.

    An empty path, a directory, a path under a regular file, a special file or a directory where no file
    can be created raise :class:`~lowbit.errors.ConfigError` naming the path and the reason, before anything
    is written.
    """
    target, directory, name, mode = _check_target(path)
    _remove_stale_temps(directory, name)
    with _signals_raise():
        handle, temporary = _create_temp(target, directory, name)
        try:
            with os.fdopen(handle, "wb") as file:
                if mode is not None:
                    os.fchmod(file.fileno(), mode) if hasattr(os, "fchmod") else os.chmod(temporary, mode)
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    _fsync_directory(directory)


def _check_target(path: str | os.PathLike[str]) -> tuple[str, str, str, int | None]:
    """(target, its directory, created if missing, its file name, the mode to keep or None for a new file)."""
    target = os.fsdecode(os.fspath(path))
    if not target:
        raise ConfigError("cannot write to an empty path; give a file name")

    def fail(reason: str) -> ConfigError:
        return ConfigError(f"cannot write {target!r}: {reason}")

    name = os.path.basename(target)
    if name in ("", ".", "..") or os.path.isdir(target):
        raise fail("it is a directory; give a file path")
    directory = os.path.dirname(os.path.abspath(target))
    existing = directory
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise fail(f"{existing!r} is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
        info = os.stat(target)
    except FileNotFoundError:
        return target, directory, name, None
    except OSError as exc:
        raise fail(f"{exc.strerror or exc} ({exc.filename!r})") from None
    if not stat.S_ISREG(info.st_mode):
        raise fail("it exists and is not a regular file")
    return target, directory, name, stat.S_IMODE(info.st_mode)


def _create_temp(target: str, directory: str, name: str) -> tuple[int, str]:
    """A new temporary file for ``target`` (open for writing, mode ``0o666 & ~umask``) and its path."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temporary = os.path.join(directory, f".{name}.{os.getpid()}.{_writer_tag()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot write {target!r}: no file can be created in {directory!r} "
                              f"({exc.strerror or exc})") from None
    raise ConfigError(f"cannot write {target!r}: no free temporary file name in {directory!r}")


_TAG: list[str] = []


def _writer_tag() -> str:
    """8 hex digits naming this host, boot and pid namespace: where the pid in a temporary file's name holds."""
    if not _TAG:
        parts = [socket.gethostname()]
        with contextlib.suppress(OSError):
            with open("/proc/sys/kernel/random/boot_id") as file:
                parts.append(file.read().strip())
        with contextlib.suppress(OSError):
            parts.append(os.readlink("/proc/self/ns/pid"))
        _TAG.append(hashlib.sha1("\0".join(parts).encode()).hexdigest()[:8])
    return _TAG[0]


_OWN_TEMP = re.compile(r"(\d{1,10})\.([0-9a-f]{8})\.[0-9a-f]{8}")
_MKSTEMP_TEMP = re.compile(r"[a-z0-9_]{8}")  # tempfile.mkstemp's names, as earlier versions wrote them


def _is_stale(middle: str, age: float) -> bool:
    """Whether the temporary file ``.{name}.{middle}.tmp``, last modified ``age`` seconds ago, is left over.

    It is when its name carries this host's tag and the pid of a process that no longer runs, or when
    it is older than :data:`STALE_TEMP_SECONDS` (other hosts, old names, a reused pid); a live writer's
    file is never removed (unless its write stalls that long, which then fails at the rename).
    """
    own = _OWN_TEMP.fullmatch(middle)
    if own is None and _MKSTEMP_TEMP.fullmatch(middle) is None:
        return False  # not a temporary file of write_atomic
    if age >= STALE_TEMP_SECONDS:
        return True
    return own is not None and own[2] == _writer_tag() and not _pid_alive(int(own[1]))


def _pid_alive(pid: int) -> bool:
    if os.name != "posix" or pid == os.getpid():
        return True  # cannot tell (age decides), or this process (another thread may be writing)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return pid > 0


def _remove_stale_temps(directory: str, name: str) -> None:
    """Remove the stale temporary files of target ``name`` in ``directory`` (see :func:`_is_stale`)."""
    prefix, suffix, now = f".{name}.", ".tmp", time.time()
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(prefix) and e.name.endswith(suffix)]
    except OSError:
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            info = entry.stat(follow_symlinks=False)
            middle = entry.name[len(prefix) : -len(suffix)]
            if stat.S_ISREG(info.st_mode) and _is_stale(middle, now - info.st_mtime):
                os.unlink(entry.path)


class _Signalled(BaseException):
    """A terminating signal that arrived while :func:`write_atomic` held a temporary file."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_CLEANUP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, n))


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """In the main thread, the :data:`_CLEANUP_SIGNALS` at their default action raise :class:`_Signalled`
    inside the block; after the block's cleanup the process dies of the signal, as it would have."""
    previous: dict[int, Any] = {}
    signalled = None

    def raise_signalled(signum: int, frame: object) -> None:
        raise _Signalled(signum)

    try:
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError):  # signals cannot be set here (not the main interpreter)
                for signum in _CLEANUP_SIGNALS:
                    if signal.getsignal(signum) is signal.SIG_DFL:
                        previous[signum] = signal.signal(signum, raise_signalled)
        yield
    except _Signalled as exc:
        signalled = exc.signum
    finally:
        signalled = _restore_signals(previous) or signalled
    if signalled is not None:
        signal.raise_signal(signalled)  # the default action: the process ends here
        raise SystemExit(128 + signalled)  # only if the signal is blocked


def _restore_signals(previous: dict[int, Any]) -> int | None:
    """Put the previous handlers back; returns a signal that arrived meanwhile (``signal.signal`` runs
    pending handlers first), or None."""
    signalled = None
    while previous:
        signum, handler = previous.popitem()
        while True:
            try:
                signal.signal(signum, handler)
                break
            except _Signalled as exc:
                signalled = exc.signum
    return signalled


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (POSIX; best effort)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        handle = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
