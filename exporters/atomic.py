"""Every file and directory kpc writes goes through here: complete or absent, never clobbering.

Why one module: an output that a reader can see half-written, or a write that replaces
what was not ours (a device file, a symlink, another run's result), is the kind of
failure a user finds days later. The rules, for every output (artifacts, tables,
reports, plots, checkpoints, metrics):

* Write into a temporary sibling whose name carries the writer's pid
  (``.NAME.<pid>.<token>.kpc-tmp``), fsync it, then rename it into place, and fsync the
  parent directory. A run killed with SIGKILL leaves only such a sibling, and the next
  write to the same name removes the debris of every writer that is no longer alive.
* Refuse, in one line, to replace anything that is not a regular file or a directory:
  devices, FIFOs and sockets are never replaced; a symlink to a regular file is followed
  (the link stays, its target gets the new content); any other symlink is refused.
* A directory is replaced only when asked (``overwrite``) and only when it is empty or
  holds a kpc record (plan.json, export.json, ...); the swap is one atomic
  exchange (``renameat2(RENAME_EXCHANGE)``), so a kill at any moment leaves either the old
  output or the new one in place, never neither.
* Outputs get the permissions the umask gives (``mkstemp`` would make them 0600).
* A lock per output: a second process writing the same output is refused while the
  first is alive, naming its pid; a lock whose owner died is taken over (``flock`` locks
  vanish with their process).

This module is in ``exporters`` because ``exporters`` must never import ``kpc``; kpc uses
it through ``kpc.atomic``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from exporters.errors import OutputError

TMP_SUFFIX = ".kpc-tmp"
OLD_SUFFIX = ".kpc-old"
LOCK_SUFFIX = ".kpc-lock"
# A directory kpc wrote holds one of its records: what lets --overwrite replace it (and nothing else).
KPC_RECORDS = ("plan.json", "export.json", "report.json", "stage.json", "state.json", "pending.json")
_DEBRIS = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]+(?P<kind>\.kpc-tmp|\.kpc-old)$")
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


# ---------------------------------------------------------------- small helpers


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (e.g. /proc-like mounts) do not support fsync; the rename still holds
        pass
    finally:
        os.close(fd)


def _umask_permissions(root: Path) -> None:
    """Files and folders as the umask makes them: writers such as safetensors create files 0600."""
    mask = _umask()
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(Path(folder) / name, 0o777 & ~mask)
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                os.chmod(path, 0o666 & ~mask)
    os.chmod(root, 0o777 & ~mask)


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder), directory=True)


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


_LIBC = _libc()


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux renameat2; False where the C library or the filesystem lacks it (the caller falls back)."""
    function = getattr(_LIBC, "renameat2", None) if _LIBC is not None else None
    if function is None:
        return False
    result = function(_AT_FDCWD, os.fsencode(str(source)), _AT_FDCWD, os.fsencode(str(target)), flags)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def _debris_name(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{kind}")


def clean_debris(target: Path) -> list[Path]:
    """Remove temporaries of `target` left by writers that are no longer alive; returns what was removed.

    An old output parked by a killed two-step replace (``.kpc-old``) is put back when the
    target is missing, so the only copy of a result is never deleted.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _DEBRIS.match(entry.name)
        if match is None or match["name"] != target.name or _pid_alive(int(match["pid"])):
            continue
        if match["kind"] == OLD_SUFFIX and not os.path.lexists(target):
            with contextlib.suppress(OSError):
                os.rename(entry, target)
                continue
        with contextlib.suppress(OSError):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
    return removed


# ---------------------------------------------------------------- what may be replaced


def _describe(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _refuse_empty(target: str | Path) -> None:
    """An empty path would become the current directory (Path("") is "."): refuse it rather than write there."""
    if not str(target).strip():
        raise OutputError("the output path is empty: give a file or directory path")


def _refuse_file_ancestor(target: Path) -> None:
    """A path under an existing file (`notes.txt/out`) can never be made: say so before any work, not at mkdir."""
    folder = target.absolute().parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {target}: {folder} is not a directory; give a path inside a directory")


def resolve_file_target(target: str | Path) -> Path:
    """The path a file write really replaces: `target`, or a symlink's regular-file target; else refuse."""
    _refuse_empty(target)
    target = Path(target)
    _refuse_file_ancestor(target)
    if target.is_symlink():
        real = Path(os.path.realpath(target))
        if real.exists() and not real.is_file():
            raise OutputError(f"{target} is a symlink to {real}, which is not a regular file: kpc will not replace "
                              "it; give another output path")
        if not real.exists() and not real.parent.is_dir():
            raise OutputError(f"{target} is a symlink to {real}, whose directory does not exist: give another "
                              "output path")
        target = real
    if target.exists():
        mode = target.stat().st_mode
        if stat.S_ISDIR(mode):
            raise OutputError(f"{target} is a directory: give a file path for this output")
        if not stat.S_ISREG(mode):
            raise OutputError(f"{target} is {_describe(mode)}: kpc only replaces regular files; give another "
                              "output path")
    return target


def is_kpc_directory(path: Path) -> bool:
    """A directory kpc wrote: an artifact, an export, a checkpoint, a run (or one of its stages)."""
    if any((path / name).is_file() for name in KPC_RECORDS):
        return True
    return any(child.is_dir() and any((child / name).is_file() for name in KPC_RECORDS)
               for child in path.iterdir() if not child.is_symlink())


def check_dir_target(target: str | Path, *, overwrite: bool) -> Path:
    """Refuse a directory output kpc must not write: a file, a device, a symlink, or a directory
    that is not empty and (with `overwrite`) was not written by kpc."""
    _refuse_empty(target)
    target = Path(target)
    _refuse_file_ancestor(target)
    if target.is_symlink():
        raise OutputError(f"{target} is a symlink: kpc writes output directories only at real paths (give "
                          f"{os.path.realpath(target)} or another path)")
    if not target.exists():
        return target
    mode = target.stat().st_mode
    if not stat.S_ISDIR(mode):
        what = "an existing file" if stat.S_ISREG(mode) else _describe(mode)
        raise OutputError(f"output {target} is {what}, not a directory: give a directory path that does not exist")
    if not any(target.iterdir()):
        return target
    if not overwrite:
        raise OutputError(f"output directory {target} already exists and is not empty: remove it or pass "
                          "--overwrite")
    if not is_kpc_directory(target):
        raise OutputError(f"output directory {target} was not written by kpc (it holds no kpc record such as "
                          "plan.json): --overwrite only replaces kpc's own outputs; remove it yourself or pick another "
                          "path")
    return target


def check_writable(target: str | Path, *, need_bytes: int = 0) -> None:
    """Fail in seconds, before long work, when the output's directory is read-only or too full.

    The nearest existing ancestor is what will hold the output; `need_bytes` is a lower
    bound of what the output takes (an artifact: its weights).
    """
    target = Path(target).absolute()
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {target}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {target}: {folder} is not writable; pick another output path")
    probe = folder / f".kpc-write-probe.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        probe.write_bytes(b"kpc")
    except OSError as exc:
        raise OutputError(f"cannot write {target}: writing in {folder} fails ({exc.strerror}); pick another "
                          "output path") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    if need_bytes > 0:
        free = shutil.disk_usage(folder).free
        if free < need_bytes:
            raise OutputError(f"cannot write {target}: {folder} has {free / 1e6:.1f} MB free and the output needs "
                              f"about {need_bytes / 1e6:.1f} MB; free space or pick another output path")


# ---------------------------------------------------------------- locks


_HELD: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth): a process may nest writes to one output


def lock_path(target: Path) -> Path:
    target = Path(target).absolute()
    return target.with_name(f".{target.name}{LOCK_SUFFIX}")


@contextlib.contextmanager
def output_lock(target: str | Path, *, what: str = "output") -> Iterator[None]:
    """Hold the lock of `target` (a sibling ``.NAME.kpc-lock``): refuse while another live process holds it."""
    path = lock_path(Path(target))
    key = str(path)
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth - 1)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, what, Path(target))
    _HELD[key] = (fd, 1)
    try:
        yield
    finally:
        _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _acquire(path: Path, what: str, target: Path) -> int:
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputError(f"another kpc process{holder} is writing the {what} {target}: wait for it to finish "
                              "or pick another output path") from None
        # The previous holder may have unlinked the file between our open and our lock: lock the live file.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid()}).encode())
            return fd
        os.close(fd)
    raise OutputError(f"could not lock {target}: its lock file keeps changing; retry")


def _read_holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 256, 0) or b"{}")
        return f" (pid {int(data['pid'])})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


# ---------------------------------------------------------------- writing


def make_private_dir(path: Path) -> None:
    """mkdir with the umask's permissions (mkdtemp would make it 0700)."""
    os.mkdir(path, 0o777 & ~_umask())


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, overwrite: bool = False, lock: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces `target` in one step when the block succeeds.

    Nothing is left behind on failure.
    """
    target = Path(target)
    with output_lock(target) if lock else contextlib.nullcontext():
        check_dir_target(target, overwrite=overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_debris(target)
        tmp = _debris_name(target, TMP_SUFFIX)
        try:  # the mkdir inside the try: a signal landing just after it must still remove the directory
            make_private_dir(tmp)
            yield tmp
            _umask_permissions(tmp)
            _fsync_tree(tmp)
            check_dir_target(target, overwrite=overwrite)  # it may have appeared while we worked
            _move_dir_into_place(tmp, target)
            _fsync_path(target.parent if str(target.parent) else Path("."), directory=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _move_dir_into_place(tmp: Path, target: Path) -> None:
    if not os.path.lexists(target):
        if not _renameat2(tmp, target, _RENAME_NOREPLACE):
            os.rename(tmp, target)
        return
    if _renameat2(tmp, target, _RENAME_EXCHANGE):  # the new output in place, the old one now at `tmp`
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # No exchange on this filesystem: park the old output under a pid-tagged name first; if a kill
    # lands between the renames, `clean_debris` puts it back on the next run.
    old = _debris_name(target, OLD_SUFFIX)
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w", *, lock: bool = False) -> Iterator[IO[Any]]:
    """Yield an open file whose content replaces `target` only when the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode 'w' or 'wb', not {mode!r}")
    target = resolve_file_target(target)
    with output_lock(target) if lock else contextlib.nullcontext():
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_debris(target)
        tmp = _debris_name(target, TMP_SUFFIX)
        try:  # the open inside the try: a signal landing just after it must still remove the file
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
            with os.fdopen(fd, mode) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            resolve_file_target(target)  # still a regular file (or absent)?
            os.replace(tmp, target)
            _fsync_path(target.parent, directory=True)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def write_text_atomic(target: str | Path, text: str) -> Path:
    with atomic_file(target, "w") as handle:
        handle.write(text)
    return Path(target)


def write_bytes_atomic(target: str | Path, data: bytes) -> Path:
    with atomic_file(target, "wb") as handle:
        handle.write(data)
    return Path(target)


def append_line(target: str | Path, line: str) -> None:
    """Append one line to a log-like file (metrics): a kill loses at most that line, never earlier ones."""
    target = resolve_file_target(target)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666 & ~_umask())
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
