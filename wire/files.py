"""Private files and directories: 0600 files and 0700 directories from the moment they exist.

Every file the programs keep for themselves goes through here: the agent's state directory, outbox and sequence
file, the collector's quarantine and gateway registry, every key directory and key file, the device CA. Modes
are set explicitly (os.open with a mode and fchmod, mkdir then chmod) because the umask is not ours to trust:
a service manager or a shell may run us with umask 000 or 022.

    private_dir(path)            a directory 0700 (missing parents too); an existing one is tightened
    write_private(path, data)    a file 0600, written atomically (or exclusively, overwrite=False)
    private_file(path)           a file 0600 that exists (created empty), e.g. before another library opens it
    private_sqlite(path)         the same for an SQLite database, and its -wal, -shm and -journal files
    flocked(path)                an flock on a private lock file, held for a `with` block (across processes)
    fsync_dir(path)              make a rename or removal in a directory durable

An existing file or directory with more permissions than that is tightened with chmod, and a warning names it
once. Nothing is ever made more permissive (a 0400 key stays 0400).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("citynerve.files")

FILE_MODE = 0o600
DIR_MODE = 0o700

# SQLite's companion files. SQLite creates them with the main file's permissions, so a 0600 database gives
# 0600 companions; older ones made before this module existed are tightened.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_tightened: set[str] = set()


def tighten(path: Path | str, mode: int = FILE_MODE) -> bool:
    """Remove every permission bit beyond `mode` from an existing `path`. True if it had any.

    A file we do not own cannot be chmodded: that is a warning, not an error (the owner's mode is theirs).
    """
    path = Path(path)
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return False
    wanted = current & mode
    if current == wanted:
        return False
    try:
        os.chmod(path, wanted)
    except PermissionError:
        _warn_once(path, f"{path} has mode {current:04o}, more open than {mode:04o}, and this user cannot "
                         "change it: make it private (chmod) or owned by the service user")
        return False
    _warn_once(path, f"{path} had mode {current:04o}, more open than {mode:04o}: set to {wanted:04o}")
    return True


def private_dir(path: Path | str, *, tighten_existing: bool = True) -> Path:
    """Make `path` a directory with mode 0700, creating missing parents 0700 too.

    An existing `path` is tightened unless `tighten_existing` is False: a file's parent directory that already
    existed (a state directory shared with other files, /tmp, the working directory) is left as it is.
    Directories that existed above `path` are never touched.
    """
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            continue  # made by another process meanwhile: whoever made it chose its mode
        # mkdir's mode passes through the umask (a umask of 0277 would give 0500): set it as meant.
        os.chmod(directory, DIR_MODE)
    if not path.is_dir():
        raise NotADirectoryError(20, "not a directory", str(path))
    if tighten_existing and path not in missing:
        tighten(path, DIR_MODE)
    return path


def private_file(path: Path | str) -> Path:
    """Make sure `path` exists as a file with mode 0600: created empty if missing, tightened if looser."""
    path = Path(path)
    private_dir(path.parent, tighten_existing=False)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, FILE_MODE)
    except FileExistsError:
        tighten(path, FILE_MODE)
        return path
    try:
        os.fchmod(fd, FILE_MODE)  # os.open's mode passes through the umask
    finally:
        os.close(fd)
    return path


def private_sqlite(path: Path | str, *, create: bool = True) -> Path:
    """Prepare an SQLite database file before sqlite3 opens it: the file 0600 (created empty if missing and
    `create`; SQLite itself would make it 0644 whatever the umask) and any existing -wal, -shm or -journal
    tightened, since SQLite creates those with the main file's permissions."""
    path = Path(path)
    if create:
        private_file(path)
    else:
        tighten(path, FILE_MODE)
    for suffix in SQLITE_COMPANIONS:
        tighten(Path(f"{path}{suffix}"), FILE_MODE)
    return path


@contextlib.contextmanager
def flocked(path: Path | str, *, shared: bool = False) -> Iterator[None]:
    """Hold an flock on `path` (a private file, created if missing) for the `with` block: exclusive, or shared
    for readers. Other processes, and other opens in this one, wait; closing the file releases it (also when
    the process dies, so a crash leaves no stale lock)."""
    fd = os.open(private_file(path), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_private(path: Path | str, data: bytes, *, overwrite: bool = True, durable: bool = True) -> Path:
    """Write `data` to `path`, mode 0600 from the first byte, fsynced.

    durable=False skips both fsyncs, for a batch of thousands of files that ends with one sync_batch(): one
    flush of the disk for the batch instead of two per file (bulk enrollment: 20 ms per certificate otherwise).

    With `overwrite` (the default) the file is replaced atomically (a temporary file in the same directory,
    renamed over it; the directory is fsynced): a reader sees the old or the new content, never a part.
    Without it an existing `path` raises FileExistsError and nothing is written (O_EXCL).
    The directory must exist; create it with private_dir().
    """
    path = Path(path)
    target = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp") if overwrite else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), FILE_MODE)  # os.open's mode passes through the umask
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        if overwrite:
            os.replace(target, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise
    return path


def sync_batch(*directories: Path | str) -> None:
    """Make a batch of durable=False writes durable: sync(2) (on Linux it returns once the data is on disk), then
    the directories holding the new names."""
    os.sync()
    for directory in directories:
        fsync_dir(Path(directory))


def fsync_dir(directory: Path) -> None:
    """A rename, a new name or a removal in `directory` is durable only once the directory is."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _warn_once(path: Path, message: str) -> None:
    key = str(path)
    if key in _tightened:
        return
    _tightened.add(key)
    log.warning("%s", message, extra={"path": key})
