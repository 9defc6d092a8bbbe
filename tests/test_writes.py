"""write_atomic, the one writer of lowbit: old or new content after any kill, permissions, stale temporary
files, signals, and typed errors for paths that cannot be written."""

import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from lowbit.errors import ConfigError
from lowbit.format import atomic
from lowbit.format.atomic import STALE_TEMP_SECONDS, write_atomic

POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions, signals and pids")


def temps(directory, name):
    """The temporary files of target ``name`` in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp"))


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def child(script, *args):
    """A Python process running ``script`` (stdout piped, text)."""
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True)


# ---------------------------------------------------------------------------- kills


SAVE_FOREVER = """
import sys
from lowbit.format.atomic import write_atomic
target, size = sys.argv[1], int(sys.argv[2])
payloads = [bytes([1]) * size, bytes([2]) * size]
print("ready", flush=True)
i = 0
while True:
    write_atomic(target, payloads[i % 2])
    i += 1
"""


@POSIX
def test_a_save_killed_at_random_moments_leaves_old_or_new_content_and_the_next_save_cleans_up(tmp_path):
    target, size = tmp_path / "m.bin", 4 << 20
    valid = {bytes([1]) * size, bytes([2]) * size}
    write_atomic(target, bytes([1]) * size)
    rng = random.Random(0)
    for _ in range(5):
        saver = child(SAVE_FOREVER, target, size)
        assert saver.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.3))
        saver.kill()
        assert saver.wait() == -signal.SIGKILL
        saver.stdout.close()
        assert target.read_bytes() in valid  # complete old or complete new content, never a mix
        write_atomic(target, bytes([1]) * size)  # the next save removes what the killed one left
        assert temps(tmp_path, "m.bin") == []
        assert target.read_bytes() == bytes([1]) * size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]


@POSIX
def test_a_writer_killed_mid_write_never_leaves_a_truncated_target(tmp_path):
    target = tmp_path / "m.lowbit"
    target.write_bytes(b"old")
    script = f"""
import os, signal
from lowbit.format.atomic import write_atomic
real_fdopen = os.fdopen
def dying_fdopen(*args, **kwargs):
    f = real_fdopen(*args, **kwargs)
    write = f.write
    def half(data):
        write(data[: len(data) // 2]); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
    f.write = half
    return f
os.fdopen = dying_fdopen
write_atomic({str(target)!r}, bytes(400000))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old"  # the old file is intact, never a half-written one
    assert len(temps(tmp_path, "m.lowbit")) == 1
    write_atomic(target, b"new")
    assert temps(tmp_path, "m.lowbit") == [] and target.read_bytes() == b"new"


def test_a_failed_write_leaves_nothing_under_the_target(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "m.lowbit", b"data")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- signals


SLOW_WRITE = """
import os, sys, time
from lowbit.format.atomic import write_atomic
if sys.argv[2] == "handler":
    import signal
    def stop(signum, frame):
        raise SystemExit(3)
    signal.signal(signal.SIGTERM, stop)
def slow_fsync(fd):
    print("writing", flush=True)
    time.sleep(30)
os.fsync = slow_fsync
write_atomic(sys.argv[1], b"new")
"""


@POSIX
@pytest.mark.parametrize("handler, status", [("default", -signal.SIGTERM), ("handler", 3)])
def test_sigterm_during_a_write_removes_the_temporary_file(tmp_path, handler, status):
    target = tmp_path / "m.bin"
    target.write_bytes(b"old")
    writer = child(SLOW_WRITE, target, handler)
    assert writer.stdout.readline().strip() == "writing"
    assert len(temps(tmp_path, "m.bin")) == 1
    writer.send_signal(signal.SIGTERM)
    assert writer.wait(timeout=20) == status  # the default action still ends the process by the signal
    writer.stdout.close()
    assert target.read_bytes() == b"old" and temps(tmp_path, "m.bin") == []


def test_signal_handlers_are_restored_and_threads_can_write(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    write_atomic(tmp_path / "a", b"1")
    thread = threading.Thread(target=write_atomic, args=(tmp_path / "b", b"2"))
    thread.start()
    thread.join()
    assert {s: signal.getsignal(s) for s in before} == before
    assert (tmp_path / "a").read_bytes() == b"1" and (tmp_path / "b").read_bytes() == b"2"


# ---------------------------------------------------------------------------- permissions


@POSIX
@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_file_gets_the_umask_permissions(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "new.bin", b"x")
        write_atomic(tmp_path / "sub" / "dir" / "new.bin", b"x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "new.bin") == expected
    assert mode(tmp_path / "sub" / "dir" / "new.bin") == expected


@POSIX
@pytest.mark.parametrize("kept", [0o600, 0o755, 0o640, 0o444])
def test_an_overwritten_file_keeps_its_mode(tmp_path, kept):
    target = tmp_path / "m.bin"
    target.write_bytes(b"old")
    os.chmod(target, kept)
    old = os.umask(0o022)
    try:
        write_atomic(target, b"new")
    finally:
        os.umask(old)
    assert mode(target) == kept and target.read_bytes() == b"new"


# ---------------------------------------------------------------------------- stale temporary files


def dead_pid():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@POSIX
def test_only_stale_temporary_files_of_the_same_target_are_removed(tmp_path):
    tag = atomic._writer_tag()
    other_tag = "0" * 8 if tag != "0" * 8 else "1" * 8
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fresh = {
            f".m.bin.{dead_pid()}.{tag}.0badc0de.tmp": False,  # its writer is gone: removed
            f".m.bin.{sleeper.pid}.{tag}.0badc0de.tmp": True,  # a live writer's
            f".m.bin.{os.getpid()}.{tag}.0badc0de.tmp": True,  # this process's (another thread may be writing)
            f".m.bin.{dead_pid()}.{other_tag}.0badc0de.tmp": True,  # another host or pid namespace: cannot tell
            ".m.bin.abc_x9yz.tmp": True,  # an old-style (mkstemp) name, fresh
            ".m.bin.notes.tmp": True,  # not a name write_atomic makes
            ".m.bin.backup": True,
            f".other.bin.{dead_pid()}.{tag}.0badc0de.tmp": True,  # another target's
            f".m.bin.x.{dead_pid()}.{tag}.0badc0de.tmp": True,  # the target "m.bin.x"'s
        }
        old = {
            f".m.bin.{sleeper.pid}.{other_tag}.0badc0de.tmp": False,  # older than STALE_TEMP_SECONDS: removed
            ".m.bin.abc_x9yz.tmp": False,
            ".m.bin.notes.tmp": True,
        }
        for directory, names in (("fresh", fresh), ("old", old)):
            (tmp_path / directory).mkdir()
            for name in names:
                (tmp_path / directory / name).write_bytes(b"partial")
                if directory == "old":
                    then = time.time() - STALE_TEMP_SECONDS - 10
                    os.utime(tmp_path / directory / name, (then, then))
            not_a_file = f".m.bin.{dead_pid()}.{tag}.0badc0df.tmp"
            (tmp_path / directory / not_a_file).mkdir()
            write_atomic(tmp_path / directory / "m.bin", b"data")
            left = {p.name for p in (tmp_path / directory).iterdir()}
            assert left == {"m.bin", not_a_file} | {name for name, keep in names.items() if keep}, directory
    finally:
        sleeper.kill()
        sleeper.wait()


def test_temporary_names_carry_pid_and_tag(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_atomic(tmp_path / "m.lowbit", b"x")
    middle = seen[0][len(".m.lowbit.") : -len(".tmp")]
    pid, tag, token = middle.split(".")
    assert int(pid) == os.getpid() and tag == atomic._writer_tag() and len(token) == 8


# ---------------------------------------------------------------------------- paths that cannot be written


def refuses(path, *words):
    with pytest.raises(ConfigError) as caught:
        write_atomic(path, b"data")
    message = str(caught.value)
    for word in words:
        assert word in message, message
    return message


def test_paths_that_cannot_be_written_raise_config_error_before_writing(tmp_path):
    (tmp_path / "file").write_bytes(b"keep")
    (tmp_path / "dir").mkdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        refuses(tmp_path / "fifo", str(tmp_path / "fifo"), "not a regular file")
    before = {p.name for p in tmp_path.iterdir()}
    refuses("", "empty path")
    refuses(tmp_path / "dir", str(tmp_path / "dir"), "is a directory")
    refuses(f"{tmp_path}/new/", "is a directory")
    refuses(tmp_path / "file" / "m.lowbit", str(tmp_path / "file" / "m.lowbit"), "is not a directory")
    refuses(tmp_path / "file" / "a" / "b" / "m.lowbit", str(tmp_path / "file"), "is not a directory")
    assert {p.name for p in tmp_path.iterdir()} == before  # nothing written, no directory made
    assert (tmp_path / "file").read_bytes() == b"keep" and list((tmp_path / "dir").iterdir()) == []


def test_a_directory_where_no_file_can_be_created(tmp_path, monkeypatch):
    real_open = os.open

    def denied(path, flags, *args):
        if str(path).endswith(".tmp"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", denied)
    refuses(tmp_path / "m.lowbit", str(tmp_path / "m.lowbit"), "Permission denied")
    assert list(tmp_path.iterdir()) == []


@POSIX
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        refuses(locked / "m.lowbit", str(locked / "m.lowbit"), "Permission denied")
        refuses(locked / "sub" / "m.lowbit", str(locked / "sub" / "m.lowbit"), "Permission denied")
    finally:
        os.chmod(locked, 0o700)
