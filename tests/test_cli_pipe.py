"""A reader that goes away (`edge-agent enroll | head`) ends a command quietly, as with any Unix tool."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from labkit import stack


@pytest.mark.parametrize("command", [["edge-agent", "profiles"],
                                     ["edge-agent", "enroll", "--gateway-id", "gw-0001", "--dir", "DIR"]])
def test_output_into_a_closed_pipe_is_no_traceback(command: list[str], tmp_path: Path) -> None:
    command = [str(tmp_path / "pki") if c == "DIR" else c for c in command]
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: the program's first write fails with EPIPE
    try:
        proc = subprocess.run([stack._bin(command[0]), *command[1:]], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141  # 128 + SIGPIPE


def test_a_reader_that_stays_gets_everything() -> None:
    proc = subprocess.run([stack._bin("edge-agent"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "usage:" in proc.stdout
