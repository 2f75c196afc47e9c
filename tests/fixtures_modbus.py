"""Fixtures for real modbus servers: the simulated SDM630 (thread or process) and a silent server."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent.profiles import Profile, load_profile
from labkit.meter_sim import MeterSimulator, meter_in_thread
from labkit.process import ServerProcess, SilentServer, free_port, port_is_open

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def sdm630_profile() -> Profile:
    return load_profile("eastron_sdm630")


@pytest.fixture
def meter_sim() -> Iterator[MeterSimulator]:
    """A simulated SDM630, unit 1, on a free loopback port, serving from its own thread's event loop.

    Re-measures every 50 ms so consecutive polls see new values; `served` is the serve log.
    """
    with meter_in_thread("127.0.0.1", 0, unit=1, seed=20240611, update_interval=0.05) as sim:
        yield sim


@dataclass
class MeterProcess:
    port: int
    unit: int
    serve_log: Path
    process: ServerProcess


@pytest.fixture
def meter_sim_process(tmp_path: Path) -> Iterator[MeterProcess]:
    """`python -m labkit.meter_sim` as a separate process with a JSONL serve log."""
    port = free_port()
    serve_log = tmp_path / "served.jsonl"
    argv = [
        sys.executable, "-m", "labkit.meter_sim",
        "--port", str(port), "--unit", "3", "--serve-log", str(serve_log), "--seed", "5",
        "--update-interval", "0.05",
    ]  # fmt: skip
    proc = ServerProcess(
        "meter_sim", argv, tmp_path / "meter_sim.log", ready=lambda: port_is_open(port), cwd=REPO
    )
    with proc:
        yield MeterProcess(port, 3, serve_log, proc)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server on loopback that accepts connections and never answers. Yields its port."""
    with SilentServer() as server:
        yield server.port
