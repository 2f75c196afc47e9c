"""Fault injection for the fault tests: kill a process at the moment it is inside a write to a given file.

Linux only: /proc/<pid>/task/<tid>/syscall shows the system call a blocked thread is in and its arguments (the
first is the file descriptor), and /proc/<pid>/fd/<fd> names the file. A thread inside fdatasync() of the
outbox's WAL is in the middle of a commit: SQLite has not returned, the cycle is not yet committed for the agent.
"""

from __future__ import annotations

import os
import platform
import signal
import time

_SYSCALLS = {
    "x86_64": {1: "write", 18: "pwrite64", 74: "fsync", 75: "fdatasync"},
    "aarch64": {64: "write", 68: "pwrite64", 82: "fsync", 83: "fdatasync"},
}


def kill_inside_write(pid: int, path_suffix: str, timeout: float) -> str | None:
    """SIGKILL `pid` while one of its threads is in write/pwrite/fsync/fdatasync of a file whose path ends with
    `path_suffix`; returns that call's name. After `timeout` without catching one, kills anyway: None."""
    calls = _SYSCALLS.get(platform.machine(), {})
    deadline = time.monotonic() + timeout
    while calls and time.monotonic() < deadline:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return None  # already gone
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/syscall") as fh:
                    fields = fh.read().split()
            except OSError:
                continue
            if not fields or not fields[0].isdigit() or int(fields[0]) not in calls:
                continue
            try:
                target = os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}")
            except (OSError, ValueError, IndexError):
                continue
            if target.endswith(path_suffix):
                os.kill(pid, signal.SIGKILL)
                return calls[int(fields[0])]
    os.kill(pid, signal.SIGKILL)
    return None
