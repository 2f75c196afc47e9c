"""A small fleet on loopback for the operator's views (Grafana dashboards, the fleet page): real edge-agent
processes polling simulated SDM630 meters and reading a GPS on a pty, a real edge-collector writing to a real
influxd, and the troubles an operator must see, each produced the way it happens in the field:

    gw.north-1  online: meter-1 (SDM630), meter-dead (connected, never answers: poll errors), gps (a fix)
                + readings its agent sent with the clock not set (set aside in citynerve_suspect_time),
                + a garbage payload and a message speaking for another gateway on its topic (quarantined)
    gw.south-2  meter-1, gps; stopped cleanly once its data is in: offline (its last status says so)
    gw.east-3   meter-1, meter-2, meter-3, gps: one device more than the collector's device budget
                ([limits] max_devices = 3), so a device's readings are held back, its messages are not
                acknowledged end to end and its backlog grows (re-sent, held again)

Gateway ids hold a '.', a regex metacharacter, so a dashboard that puts a template variable where Grafana's
regex escaping breaks it finds nothing.

    lab = FleetLab(work_dir, broker, influxd, "fleet").start()   # returns once every trouble above is stored
    ...
    lab.close()
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit import stack
from labkit.influxd import InfluxdServer
from labkit.meter_sim import meter_in_thread
from labkit.mosquitto import MosquittoServer
from labkit.process import ServerProcess, SilentServer, free_port
from labkit.serial_devices import StreamingDevice
from wire.envelope import seal_plain
from wire.mqttlink import MqttLink, MqttSettings
from wire.schema import Batch, Reading

NORTH, SOUTH, EAST = "gw.north-1", "gw.south-2", "gw.east-3"
# A seq far beyond what the lab's agents reach: the collector acknowledges it to gw.north-1, whose outbox never
# holds it, so the acknowledgement deletes nothing (docs/wire-format.md, replays and duplicates are harmless).
INJECTED_SEQ = 1 << 40
# The collector's device budget per gateway in the lab: gw.east-3 has one device more.
MAX_DEVICES = 3
# The fleet page's [web] backlog_after in the lab (well below the lab's ~20 s): gw.east-3's backlog shows once
# its oldest unacknowledged message is older, which the lab waits for.
BACKLOG_AFTER_S = 5



# The lab's own topic prefix: it shares the session's broker with other tests, and its collector must never take
# (and acknowledge) another test's gateway's messages - seen: test_outbox_e2e's backlog drained by the lab's collector.
PREFIX = "fleetlab/v1"

@dataclass(frozen=True)
class GatewayPlan:
    id: str
    latitude: float
    longitude: float
    meters: tuple[str, ...] = ("meter-1",)
    dead_device: bool = False


PLANS = (
    GatewayPlan(NORTH, 52.3791, 4.9003, dead_device=True),
    GatewayPlan(SOUTH, 52.3412, 4.8723),
    GatewayPlan(EAST, 52.3608, 4.9402, meters=("meter-1", "meter-2", "meter-3")),
)


def nmea_gga(latitude: float, longitude: float, utc: str = "120000.00") -> bytes:
    """A GGA sentence with a GPS fix at the position (NMEA 0183: ddmm.mmmm / dddmm.mmmm, checksum = XOR of the
    characters between '$' and '*')."""

    def angle(value: float, degree_digits: int) -> str:
        degrees = int(abs(value))
        minutes = (abs(value) - degrees) * 60
        return f"{degrees:0{degree_digits}d}{minutes:07.4f}"

    body = (f"GPGGA,{utc},{angle(latitude, 2)},{'N' if latitude >= 0 else 'S'},{angle(longitude, 3)},"
            f"{'E' if longitude >= 0 else 'W'},1,08,0.9,12.0,M,46.9,M,,")
    checksum = functools.reduce(lambda acc, ch: acc ^ ord(ch), body, 0)
    return f"${body}*{checksum:02X}\r\n".encode()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"fleet lab: timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


@dataclass
class FleetLab:
    work: Path
    broker: MosquittoServer
    influx: InfluxdServer
    database: str
    # extra sections of collector.toml, merged over the lab's
    collector_sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    # serve the fleet page ([web]) on a free loopback port, with a token (web_url, web_token)
    web: bool = False
    web_url: str = ""
    web_token: str = ""
    plans: tuple[GatewayPlan, ...] = PLANS
    agents: dict[str, ServerProcess] = field(default_factory=dict)
    collector: ServerProcess | None = None
    collector_config: Path | None = None
    gps: dict[str, StreamingDevice] = field(default_factory=dict)
    meter_ports: dict[str, int] = field(default_factory=dict)  # "<gateway>/<device>" -> port
    started_ns: int = 0
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def gateways(self) -> list[str]:
        return [plan.id for plan in self.plans]

    @property
    def quarantine_path(self) -> Path:
        return self.work / "collector.quarantine.db"

    def query(self, q: str) -> list[dict[str, Any]]:
        return self.influx.query(q, self.database)

    # -- start --------------------------------------------------------------------------------------------------

    def start(self, timeout: float = 40.0) -> FleetLab:
        try:
            self._start(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.started_ns = time.time_ns()
        self.influx.create_database(self.database)
        sections: dict[str, dict[str, Any]] = {
            "limits": {"max_devices": MAX_DEVICES},
            "log": {"stats_interval": "2s"},
            "quarantine": {"path": str(self.quarantine_path)},
            # A health point with every heartbeat (1 s here), not only on a change and every 2 minutes: the
            # dashboards' rates of the health counters need points in several of their 10 s buckets, within the
            # seconds this lab runs (in production the counters' changes write them: collector/health.py).
            "inventory": {"path": str(self.work / "collector.inventory.db"), "health_interval": "0s"},
        }
        if self.web:
            import secrets

            self.web_token = secrets.token_hex(16)
            token_file = self.work / "web.token"
            token_file.write_text(self.web_token + "\n")
            port = free_port()
            self.web_url = f"http://127.0.0.1:{port}"
            sections["web"] = {"listen": f"127.0.0.1:{port}", "token": {"file": str(token_file)},
                               "backlog_after": f"{BACKLOG_AFTER_S}s"}
        for name, body in self.collector_sections.items():
            sections[name] = {**sections.get(name, {}), **body}
        self.collector_config = stack.write_collector_config(
            self.work / "collector.toml", stack.mqtt_section(self.broker, client_id="collector-fleet", topic_prefix=PREFIX),
            {"api": "v1", "url": self.influx.url, "database": self.database}, **sections)
        self.collector = self._stack.enter_context(stack.collector_process(self.collector_config))
        for plan in self.plans:
            self._start_gateway(plan)
        self._wait_for_data(timeout)
        # gw.south-2 goes away cleanly: its final status says offline.
        self.agents[SOUTH].stop()
        self._inject()
        wait_until(lambda: self.query(f"SELECT last(online) FROM citynerve_gateway_health WHERE gateway = '{SOUTH}'")
                   [0]["last"] == 0, timeout, f"{SOUTH} stored as offline")
        wait_until(lambda: self.query(f"SELECT count(sample_time_ns) FROM citynerve_suspect_time WHERE gateway = "
                                      f"'{NORTH}'"), timeout, "the set-aside readings of gw.north-1")
        wait_until(lambda: len(self.quarantine_reasons()) >= 2, timeout, "two quarantined messages")

    def _start_gateway(self, plan: GatewayPlan) -> None:
        ports = {}
        for name in plan.meters:  # one simulated meter each (one unit per host:port and bus)
            meter = self._stack.enter_context(meter_in_thread("127.0.0.1", 0, unit=1, seed=len(self.meter_ports),
                                                              update_interval=0.2))
            ports[name] = self.meter_ports[f"{plan.id}/{name}"] = meter.port
        gps = StreamingDevice([nmea_gga(plan.latitude, plan.longitude)], period=0.5)
        self._stack.callback(gps.close)
        self.gps[plan.id] = gps
        devices = [stack.modbus_tcp_device(name, port, interval="1s", tags={"site": plan.id.split("-")[0]})
                   for name, port in ports.items()]
        sections: dict[str, Any] = {}
        if plan.dead_device:  # connected, never answers: every poll times out (and is tried again within 1 s)
            mute = SilentServer()
            self._stack.callback(mute.close)
            sections["buses"] = [{"id": "mute", "target": f"tcp://127.0.0.1:{mute.port}", "timeout": "300ms",
                                  "backoff_max": "1s"}]
            devices.append({"kind": "modbus", "id": "meter-dead", "bus": "mute", "profile": "eastron_sdm630",
                            "interval": "1s"})
        devices.append({"kind": "serial", "id": "gps", "port": gps.device, "protocol": "nmea", "baud": 4800})
        config = stack.write_agent_config(
            self.work / f"{plan.id}.toml", plan.id, stack.mqtt_section(self.broker, topic_prefix=PREFIX), devices,
            uplink={"heartbeat_interval": "1s", "ack_timeout": "2s", "ack_timeout_max": "4s"}, **sections,
        )
        self.agents[plan.id] = self._stack.enter_context(stack.agent_process(config))

    def _wait_for_data(self, timeout: float) -> None:
        def counts(q: str) -> dict[str, int]:
            return {r["gateway"]: r["count"] for r in self.query(q + " GROUP BY gateway")}

        missing: list[str] = []

        def ready() -> bool:
            # heartbeats in two 10 s buckets at least: a dashboard's rate of a counter (non_negative_difference
            # per interval, 10 s at the finest) needs two
            health = {g: n for g, n in counts("SELECT count(online) FROM citynerve_gateway_health").items()
                      if len({r["time"] for r in self.query(
                          f"SELECT count(online) FROM citynerve_gateway_health WHERE gateway = '{g}' AND "
                          f"time >= {self.started_ns} GROUP BY time(10s) fill(none)")}) >= 2}
            meters = counts("SELECT count(voltage_l1) FROM electricity")
            fixes = counts("SELECT count(latitude) FROM gps")
            dead = self.query(f"SELECT max(errors) FROM citynerve_device_health WHERE gateway = '{NORTH}' "
                              "AND device = 'meter-dead'")
            backlog = self.query(f"SELECT max(backlog_messages), max(resent_messages), last(backlog_age_s) FROM "
                                 f"citynerve_gateway_health WHERE gateway = '{EAST}'")
            missing[:] = [f"{what} of {g}" for g in self.gateways
                          for what, have, need in (("heartbeats over 10 s", health, 3), ("meter readings", meters, 3),
                                                   ("GPS fixes", fixes, 1)) if have.get(g, 0) < need]
            if not (dead and dead[0]["max"] and grew("citynerve_device_health", "errors",
                                                     f"gateway = '{NORTH}' AND device = 'meter-dead'")):
                missing.append(f"poll errors of {NORTH}/meter-dead growing from one 10 s interval to another")
            if not (backlog and backlog[0]["max"] and backlog[0]["max_1"] and backlog[0]["last"] > BACKLOG_AFTER_S
                    and grew("citynerve_gateway_health", "resent_messages", f"gateway = '{EAST}'")):
                missing.append(f"a backlog of {EAST} and its re-sends growing from one 10 s interval to another")
            return not missing

        def grew(measurement: str, field: str, where: str) -> bool:
            """A counter's rate per 10 s interval (a dashboard's finest) shows it: it grew between two intervals."""
            rows = self.query(f"SELECT max({field}) FROM {measurement} WHERE {where} AND time >= {self.started_ns} "
                              "GROUP BY time(10s) fill(none)")
            return len(rows) >= 2 and rows[-1]["max"] > rows[0]["max"]

        try:
            wait_until(ready, timeout, "data from every gateway", poll=0.5)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; missing: {', '.join(missing)}") from None

    def _inject(self) -> None:
        """What gw.north-1's agent would have sent with its clock unset, and two messages the collector refuses."""
        settings = MqttSettings(host="127.0.0.1", port=self.broker.port, ca_file=str(self.broker.ca.cert_path))
        link = MqttLink(settings, "fleet-lab-injector")
        link.start()
        try:
            if not link.connected.wait(10):
                raise TimeoutError("fleet lab: the injector could not connect to the broker")
            up = f"{PREFIX}/{NORTH}/up"
            clock_unset = Batch(NORTH, INJECTED_SEQ, 1_000_000_000, [
                Reading("meter-1", "electricity", 1_000_000_000 + i * 1_000_000_000, {"voltage_l1": 229.5 + i})
                for i in range(3)])
            speaking_for_another = Batch(SOUTH, INJECTED_SEQ, time.time_ns(), [])
            for payload in (seal_plain(clock_unset), b"\x01\xc1garbage", seal_plain(speaking_for_another)):
                link.publish(up, payload, qos=1).wait_for_publish(5)
        finally:
            link.stop()

    # -- reading back -------------------------------------------------------------------------------------------

    def quarantine_reasons(self) -> dict[str, int]:
        """Quarantined messages by reason code, read from the collector's quarantine file."""
        if not self.quarantine_path.exists():
            return {}
        with contextlib.closing(sqlite3.connect(f"file:{self.quarantine_path}?mode=ro", uri=True, timeout=5)) as db:
            try:
                return dict(db.execute("SELECT reason, count(*) FROM quarantine GROUP BY reason").fetchall())
            except sqlite3.OperationalError:  # not created yet
                return {}

    def close(self) -> None:
        self._stack.close()
