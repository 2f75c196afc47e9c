"""systemd's notification protocol (wire/systemd.py) with a real datagram socket as $NOTIFY_SOCKET, and the real
programs speaking it: READY when really ready, STATUS, RELOADING/READY around a collector's SIGHUP, STOPPING, and
WATCHDOG=1 at WATCHDOG_USEC/2 only while the event loop and the watched threads are healthy.

There is no systemd as PID 1 here (no `systemd-run`), so the service manager's side is this socket; the unit
files are checked by test_systemd_units.py with systemd-analyze. A blocked loop and a stuck outbox thread are
made by a test-only wrapper around the real command line (nothing in the programs reads it), as in
test_supervise_process.py; it marks the start and end of each fault with a datagram of its own on the same
socket, so the test knows exactly when no ping may arrive.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import socket
import statistics
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from labkit import stack
from labkit.process import ServerProcess, free_port
from wire.systemd import Notifier, Service, WatchdogCore, notify_address, watchdog_seconds

# -- the service manager's end: a datagram socket that records what arrives, with its arrival time ------------


@dataclass(frozen=True)
class Note:
    at: float  # time.monotonic() on arrival (CLOCK_MONOTONIC: the same clock in every process of this machine)
    fields: dict[str, str]


class NotifySocket:
    def __init__(self, address: str | bytes) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.notes: list[Note] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    @property
    def env(self) -> str:
        a = self.address
        return "@" + a[1:].decode() if isinstance(a, bytes) else a

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            with self._cond:
                self.notes.append(Note(time.monotonic(), fields))
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Note], bool], timeout: float = 20.0, after: float = 0.0) -> Note:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for note in self.notes:
                    if note.at >= after and predicate(note):
                        return note
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no such notification within {timeout}s; got {self.notes[-10:]}")
                self._cond.wait(left)

    def pings(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        with self._cond:
            return [n.at for n in self.notes if n.fields.get("WATCHDOG") == "1" and start <= n.at <= end]

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self.sock.close()


def _listener(kind: str, tmp_path: Path) -> NotifySocket:
    if kind == "path":
        return NotifySocket(str(tmp_path / "notify.sock"))
    return NotifySocket(b"\0citynerve-test-" + uuid.uuid4().hex.encode())  # systemd's own: "@/org/freedesktop/..."


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    listener = _listener(request.param, tmp_path)
    yield listener
    listener.close()


@pytest.fixture
def notify_abstract(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = _listener("abstract", tmp_path)
    yield listener
    listener.close()


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = _listener("path", tmp_path)
    yield listener
    listener.close()


def has(key: str, value: str | None = None) -> Callable[[Note], bool]:
    return lambda note: key in note.fields and (value is None or note.fields[key] == value)


# -- the pure parts -----------------------------------------------------------------------------------------


def test_notify_socket_names() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@/org/freedesktop/systemd1/notify/123") == b"\0/org/freedesktop/systemd1/notify/123"
    assert notify_address(None) is None and notify_address("") is None
    assert notify_address("vsock:2:1234") is None  # not spoken here: nothing is sent


def test_watchdog_interval_is_for_the_main_process_only() -> None:
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000"}, pid=42) == 30.0
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, pid=42) == 30.0
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"}, pid=42) is None
    assert watchdog_seconds({"WATCHDOG_USEC": "0"}, pid=42) is None
    assert watchdog_seconds({"WATCHDOG_USEC": "soon"}, pid=42) is None
    assert watchdog_seconds({}, pid=42) is None


def test_watchdog_core_names_what_is_late() -> None:
    core = WatchdogCore()
    core.watch("outbox thread", allowed=120.0, now=1000.0)
    core.watch("cycle", allowed=60.0, now=1000.0)
    assert core.stale(1059.0) == []
    core.progress("outbox thread", 1050.0)
    assert core.stale(1061.0) == [("cycle", 61.0)]
    core.progress("cycle", 1061.0)
    core.progress("cycle", 1040.0)  # an old answer arriving late does not move progress back
    assert core.stale(1110.0) == []
    core.progress("cycle", 1150.0)
    assert core.stale(1171.0) == [("outbox thread", 121.0)]
    core.unwatch("outbox thread")
    assert core.stale(1171.0) == []


def test_nothing_is_sent_without_notify_socket() -> None:
    service = Service.from_env({"WATCHDOG_USEC": "1000000"})
    assert not service.active and service.watchdog is None
    service.ready("ready")  # does nothing, raises nothing
    assert service.tasks(lambda: "") == []


def test_a_vanished_socket_costs_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "gone.sock"))
    assert not notifier.send("READY=1") and not notifier.send("WATCHDOG=1")
    assert notifier.failures == 2
    assert len([r for r in caplog.records if "cannot notify the service manager" in r.message]) == 1


# -- the shell in-process: pings from the loop, at WATCHDOG_USEC/2, stopped by a stuck executor --------------


def test_one_datagram_per_notification_to_a_path_or_an_abstract_socket(notify_socket: NotifySocket) -> None:
    service = Service.from_env({"NOTIFY_SOCKET": notify_socket.env})
    service.ready("polling 3 device(s)")
    service.status("polling 3 device(s)")  # unchanged: not sent again
    service.status("polling 4 device(s)")
    service.stopping()
    stopping = notify_socket.wait_for(has("STOPPING", "1"))
    got = [n.fields for n in notify_socket.notes if n.at <= stopping.at]
    assert got == [{"READY": "1", "STATUS": "polling 3 device(s)", "MAINPID": str(os.getpid())},
                   {"STATUS": "polling 4 device(s)"}, {"STOPPING": "1", "STATUS": "stopping"}]


def test_pings_stop_while_a_watched_thread_is_stuck_and_the_loop_is_blocked(notify_path: NotifySocket) -> None:
    notify_socket = notify_path
    async def scenario() -> dict[str, float]:
        service = Service.from_env({"NOTIFY_SOCKET": notify_socket.env, "WATCHDOG_USEC": "200000"})
        executor = ThreadPoolExecutor(1, thread_name_prefix="stuck")
        service.watch_executor("stuck thread", executor, allowed=0.5)
        task, = service.tasks(lambda: "testing")
        marks: dict[str, float] = {}
        await asyncio.sleep(1.0)
        marks["stuck"] = time.monotonic()
        release = threading.Event()
        executor.submit(release.wait)
        await asyncio.sleep(1.5)
        marks["released"] = time.monotonic()
        release.set()
        await asyncio.sleep(0.6)
        marks["blocked"] = time.monotonic()
        time.sleep(1.0)  # the loop itself blocked
        marks["unblocked"] = time.monotonic()
        await asyncio.sleep(0.6)
        task.cancel()
        executor.shutdown()
        return marks

    marks = asyncio.run(scenario())
    interval = 0.1  # WATCHDOG_USEC / 2
    before = notify_socket.pings(0, marks["stuck"])
    assert len(before) >= 6 and 0.05 < statistics.median(b - a for a, b in itertools.pairwise(before)) < 0.2
    # A stuck thread: pings go on until its no-op is late by its allowance, then stop until it answers again.
    assert notify_socket.pings(marks["stuck"] + 0.5 + 2 * interval, marks["released"]) == []
    assert notify_socket.pings(marks["released"], marks["released"] + 1.0)  # (slack for a loaded machine)
    # A blocked loop sends nothing.
    assert notify_socket.pings(marks["blocked"] + 0.01, marks["unblocked"]) == []
    assert notify_socket.pings(marks["unblocked"], marks["unblocked"] + 1.0)


# -- the real programs --------------------------------------------------------------------------------------

# Test-only faults around the real command line: after READY, the loop is blocked for 1.5 s, then the outbox
# thread is kept busy for 3 s (its allowance shortened to 1 s). Each fault is marked on the notify socket.
_WITH_FAULTS = textwrap.dedent("""
    import asyncio, sys, time
    from wire import systemd

    real_ready, real_watch = systemd.Service.ready, systemd.Service.watch_executor

    def watch_executor(self, name, executor, allowed):
        real_watch(self, name, executor, 1.0)

    def block_loop(service):
        service.send("TEST_FAULT=loop-blocked")
        time.sleep(1.5)
        service.send("TEST_FAULT=loop-free")

    def stick_outbox(service):
        service.send("TEST_FAULT=outbox-stuck")
        time.sleep(3.0)
        service.send("TEST_FAULT=outbox-free")

    def ready(self, status):
        real_ready(self, status)
        loop = asyncio.get_running_loop()
        loop.call_later(1.0, block_loop, self)
        loop.call_later(4.0, lambda: self._executors["outbox thread"].submit(stick_outbox, self))

    systemd.Service.ready, systemd.Service.watch_executor = ready, watch_executor
    sys.exit(__import__("edge_agent.cli").cli.main(sys.argv[1:]))
""")


def _agent_config(tmp_path: Path) -> Path:
    # A broker nobody listens on: the agent is ready without it (it polls and keeps every reading meanwhile).
    broker = {"host": "127.0.0.1", "port": free_port(), "tls": False, "reconnect_max": "2s"}
    return stack.write_agent_config(tmp_path / "agent.toml", "gw-notify", broker,
                                    [stack.modbus_tcp_device("meter-1", free_port(), interval="1s")])


def _start(argv: list[str], log: Path, notify: NotifySocket, watchdog_usec: int,
           journal: bool = False) -> ServerProcess:
    env = {"NOTIFY_SOCKET": notify.env, "WATCHDOG_USEC": str(watchdog_usec)}
    if journal:  # stderr is "the journal": the log file's device and inode, as systemd.exec(5) sets them
        log.touch()
        st = log.stat()
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    env.pop("WATCHDOG_PID", None)
    return ServerProcess(argv[0], argv, log, ready=lambda: any(has("READY", "1")(n) for n in notify.notes),
                         env=env, cwd=Path(__file__).parent.parent).start()


@pytest.mark.integration
def test_the_agent_is_ready_without_a_broker_and_pings_only_while_healthy(tmp_path: Path,
                                                                          notify_abstract: NotifySocket) -> None:
    notify_socket = notify_abstract
    config = _agent_config(tmp_path)
    agent = _start([sys.executable, "-c", _WITH_FAULTS, "run", str(config)], config.with_suffix(".log"),
                   notify_socket, watchdog_usec=400_000, journal=True)
    try:
        ready = notify_socket.wait_for(has("READY", "1"))
        assert ready.fields["MAINPID"] == str(agent.proc.pid)  # type: ignore[union-attr]
        assert ready.fields["STATUS"].startswith("polling 1 device(s); uplink not connected")
        free = notify_socket.wait_for(has("TEST_FAULT", "outbox-free"), timeout=15)
        resumed = notify_socket.wait_for(has("WATCHDOG", "1"), after=free.at, timeout=5)
        # systemctl reload: RELOADING, then READY once the configuration runs again (edge_agent/remote_config.py)
        os.kill(agent.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        reloading = notify_socket.wait_for(has("RELOADING", "1"), after=resumed.at)
        reloaded = notify_socket.wait_for(has("READY", "1"), after=reloading.at)
        assert reloaded.fields["STATUS"].startswith("polling 1 device(s)")
        agent.stop()
        stopping = notify_socket.wait_for(has("STOPPING", "1"), timeout=10)
    finally:
        agent.stop()
    log = agent.log_path.read_text()
    assert agent.proc.returncode == 0, log  # type: ignore[union-attr]
    at = {n.fields["TEST_FAULT"]: n.at for n in notify_socket.notes if "TEST_FAULT" in n.fields}
    interval = 0.2
    regular = notify_socket.pings(ready.at, at["loop-blocked"])
    assert len(regular) >= 3 and all(b - a < 1.0 for a, b in itertools.pairwise(regular)), regular  # < the 1.5 s block
    assert notify_socket.pings(at["loop-blocked"], at["loop-free"]) == []
    assert notify_socket.pings(at["loop-free"], at["loop-free"] + 1.0)
    assert notify_socket.pings(at["outbox-stuck"] + 1.0 + 2 * interval, at["outbox-free"]) == []
    assert resumed.at - free.at < 1.0
    assert not notify_socket.pings(stopping.at + 0.5)
    # Every line carries its syslog priority for the journal (sd-daemon(3)): `journalctl -p err` finds the error.
    lines = log.splitlines()
    assert lines and all(re.match(r"<[2-7]>\d{4}-", line) for line in lines), lines
    assert [line for line in lines if line.startswith("<3>")] == [
        line for line in lines if "not telling systemd that all is well: outbox thread made no progress for" in line]
    assert any(line.startswith("<6>") and "watchdog pings resumed" in line for line in lines)
    assert any(line.startswith("<4>") and "cannot reach MQTT broker" in line for line in lines)


@pytest.mark.integration
def test_the_collector_is_ready_once_subscribed_and_reloads_on_sighup(tmp_path: Path, mosquitto,
                                                                      notify_path: NotifySocket) -> None:
    notify_socket = notify_path
    from labkit.mqtt_probe import MqttProbe

    influx = {"api": "v1", "url": f"http://127.0.0.1:{free_port()}", "database": "none"}  # not needed to start
    mqtt = stack.mqtt_section(mosquitto, client_id="collector-notify", topic_prefix="notify")
    config = stack.write_collector_config(tmp_path / "collector.toml", mqtt, influx, log={"stats_interval": "0s"})
    log_path = config.with_suffix(".log")
    collector = _start([stack._bin("edge-collector"), "run", str(config)], log_path, notify_socket, 1_000_000)
    probe = MqttProbe(mosquitto.port, str(mosquitto.ca.cert_path), ["notify/+/nothing"])
    try:
        ready = notify_socket.wait_for(has("READY", "1"))
        # READY comes with the broker's SUBACK: the log line that says so was written before.
        assert "subscribed to notify/+/up, notify/+/status" in log_path.read_text()
        assert ready.fields["STATUS"].startswith("subscribed; 0 message(s)")
        third = notify_socket.wait_for(lambda n: len(notify_socket.pings(ready.at, n.at)) >= 3, after=ready.at)
        pings = notify_socket.pings(ready.at, third.at)
        assert all(0.3 < b - a < 0.8 for a, b in itertools.pairwise(pings)), pings  # WATCHDOG_USEC / 2 = 0.5 s

        def publish_garbage() -> None:
            probe.client.publish("notify/gw-x/up", b"\x01" + bytes(199), qos=1).wait_for_publish(5)

        def wait_log(text: str, timeout: float = 10.0) -> None:
            deadline = time.monotonic() + timeout
            while text not in log_path.read_text():
                assert time.monotonic() < deadline, f"no {text!r} in {collector.tail_log()}"
                time.sleep(0.05)

        publish_garbage()
        wait_log("rejected message from gateway gw-x on notify/gw-x/up: schema: ")  # decoded: not refused for size

        # A reload: one value applied at once, one that waits for a restart.
        stack.write_collector_config(config, {**mqtt, "keepalive": 33}, influx, log={"stats_interval": "0s"},
                                     validation={"max_payload_bytes": 100})
        sighup = time.monotonic()
        os.kill(collector.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        notify_socket.wait_for(has("RELOADING", "1"), after=sighup)
        notify_socket.wait_for(has("READY", "1"), after=sighup)
        wait_log("applied validation.max_payload_bytes; changed but waiting for a restart: mqtt.keepalive")
        publish_garbage()
        wait_log("too_large: 200 bytes > limit 100")

        # A file that does not load changes nothing, and says why in one line.
        stack.write_collector_config(config, {**mqtt, "keepalive": 33}, influx, log={"stats_interval": "0s"},
                                     validation={"max_payload_bytes": 1})
        sighup = time.monotonic()
        os.kill(collector.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        notify_socket.wait_for(has("READY", "1"), after=sighup)
        wait_log("reload refused, carrying on as before: ")
        assert collector.running
        collector.stop()
        notify_socket.wait_for(has("STOPPING", "1"), after=sighup)
    finally:
        probe.close()
        collector.stop()
    log = log_path.read_text()
    refused = [line for line in log.splitlines() if "reload refused" in line]
    assert len(refused) == 1 and "validation.max_payload_bytes" in refused[0], refused
    assert "Traceback" not in log and collector.proc.returncode == 0, log  # type: ignore[union-attr]
