"""The supervisor in the real programs: a task that dies ends `edge-agent run` / `edge-collector run` with one
line and a non-zero exit (for systemd to restart it), after the program's clean shutdown ran.

The fault is put in by this test only: a wrapper runs the real command line (`edge_agent.cli.main`,
`collector.cli.main`) after replacing one method so that its Nth call raises MemoryError, once. Nothing in the
programs reads the wrapper's variables; no configuration reaches it. (A real fault that kills a task is hard to
make on purpose: the ones a test can make as root, a full disk or an I/O error in the outbox, are handled
without dying, by design.)
"""

from __future__ import annotations

import sqlite3
import sys
import textwrap
from pathlib import Path

import pytest

from labkit import stack
from labkit.counter_field import PROFILE, CounterField
from labkit.influxd import InfluxdServer
from labkit.process import ServerProcess
from wire.supervise import EXIT_FATAL

pytestmark = pytest.mark.integration

_WITH_FAULT = textwrap.dedent("""
    import importlib, os, sys
    module, _, attribute = os.environ["TEST_FAULT_TARGET"].partition(":")
    owner_name, _, name = attribute.partition(".")
    owner = getattr(importlib.import_module(module), owner_name)
    real, calls = getattr(owner, name), [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(os.environ["TEST_FAULT_AT_CALL"]):
            raise MemoryError("injected by the test")
        return real(*args, **kwargs)

    setattr(owner, name, faulty)
    sys.exit(importlib.import_module(sys.argv[1] + ".cli").main(sys.argv[2:]))
""")


def with_fault(program: str, config: Path, target: str, at_call: int, ready: str) -> ServerProcess:
    log = config.with_suffix(".log")
    return ServerProcess(
        program, [sys.executable, "-c", _WITH_FAULT, program, "run", str(config)], log,
        ready=lambda: ready in log.read_text(errors="replace") if log.exists() else False,
        env={"TEST_FAULT_TARGET": target, "TEST_FAULT_AT_CALL": str(at_call)}, cwd=Path(__file__).parent.parent,
    )


def exit_code(process: ServerProcess, timeout: float = 30) -> int:
    assert process.proc is not None
    return process.proc.wait(timeout=timeout)


def test_the_agent_ends_with_one_line_and_a_non_zero_exit_when_a_task_dies(tmp_path: Path, mosquitto) -> None:
    field = CounterField(2).start()
    config = stack.write_agent_config(
        tmp_path / "agent.toml", "gw-dies", stack.mqtt_section(mosquitto),
        [stack.modbus_tcp_device(f"counter-{u}", field.port, unit=u, interval="0.2s", profile=str(PROFILE))
         for u in field.units],
        publish_interval="0.5s",
    )
    agent = with_fault("edge_agent", config, "edge_agent.outbox:Outbox.commit", at_call=4,
                       ready="connected to MQTT broker").start()
    try:
        code = exit_code(agent)
    finally:
        agent.stop()
        field.stop()
    log = agent.log_path.read_text()
    assert code == EXIT_FATAL, log
    fatal = [line for line in log.splitlines() if "fatal:" in line]
    assert len(fatal) == 1 and fatal[0].endswith("fatal: task cycle died: MemoryError: injected by the test"), log
    assert "Traceback" not in log
    # The clean shutdown ran first: the cycle whose commit failed was committed then, with what came after it.
    # (A poll whose answer was on its way when the tasks were cancelled is the only reading not kept.)
    assert log.index("agent stopped:") < log.index("fatal:")
    served = sum(len(v) for v in field.served.values())
    db = sqlite3.connect(tmp_path / "gw-dies-state" / "outbox.sqlite3")
    committed = db.execute("SELECT coalesce(sum(readings), 0) FROM message").fetchone()[0]
    assert served - len(field.units) <= committed <= served and served >= 6, (committed, served)


def test_the_collector_ends_with_one_line_and_a_non_zero_exit_when_a_task_dies(
        tmp_path: Path, mosquitto, influxd: InfluxdServer, influx_db: str) -> None:
    config = stack.write_collector_config(
        tmp_path / "collector.toml", stack.mqtt_section(mosquitto, client_id="collector-dies"),
        {"api": "v1", "url": influxd.url, "database": influx_db}, log={"stats_interval": "0.5s"},
    )
    collector = with_fault("collector", config, "collector.app:Collector._summary", at_call=2,
                           ready="subscribed to").start()
    try:
        code = exit_code(collector)
    finally:
        collector.stop()
    log = collector.log_path.read_text()
    assert code == EXIT_FATAL, log
    fatal = [line for line in log.splitlines() if "fatal:" in line]
    assert len(fatal) == 1 and fatal[0].endswith("fatal: task stats died: MemoryError: injected by the test"), log
    assert "Traceback" not in log and log.index("collector stopped:") < log.index("fatal:")
