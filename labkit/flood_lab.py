"""Parts of the flood benchmark (bench/flood.py): one enrolled gateway (A) floods, another (B) sends as an agent.

    FloodPayloads   what A sends: large valid sealed batches, random bytes, forged session announcements
    Flooder         A's own mutual-TLS connection (wire.mqttlink.MqttLink: TCP_NODELAY, MQTT 5), publishing QoS 1
                    as fast as the connection takes it, a window of messages in flight
    SteadyGateway   B: one sealed message of N readings per second, each stamped with its sample time; opens its
                    end-to-end acknowledgements and sends a message again after ack_timeout, as the agent does
    StoreWatch      B's points as they appear in InfluxDB (polled): first seen - sample time
    RssSampler      a process's VmRSS every 100 ms, and its VmHWM (reset through /proc/<pid>/clear_refs)
    stats_lines     the collector's "stats:" log lines, as (time, counters)
    QuietSecureBroker  labkit.secure_broker.SecureBroker without the lab's extra "log_type debug" line
"""

from __future__ import annotations

import calendar
import os
import queue
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from labkit.process import ServerProcess
from labkit.secure_broker import SecureBroker
from wire import ack, topics
from wire.keys import collector_key_from_pem, identity_from_pem
from wire.mqttlink import MqttLink, MqttSettings
from wire.schema import Batch, Reading, encode_batch
from wire.seal import _ANNOUNCEMENT_LEN, KID_LEN, SID_LEN, GatewaySealer  # the header layout

PREFIX = topics.DEFAULT_PREFIX
_msgpack = msgspec.msgpack.Encoder()


class QuietSecureBroker(SecureBroker):
    """The shipped configuration exactly as SecureBroker renders it, minus the debug logging the lab appends
    for the ACL tests (one log line per PUBLISH in and out, which production does not have and which would cost
    the broker's single thread a file write per message of a flood)."""

    def _new_process(self) -> ServerProcess:
        process = super()._new_process()
        lines = self.config_path.read_text().splitlines()
        self.config_path.write_text("\n".join(ln for ln in lines if ln.strip() != "log_type debug") + "\n")
        return process


def load_sealer(gateway_dir: Path, gateway_id: str, collector_pub: Path) -> GatewaySealer:
    """A sealer as edge_agent.app.make_sealer builds it, from an enrolled gateway's files."""
    return GatewaySealer(gateway_id, identity_from_pem((gateway_dir / "identity.key").read_bytes()),
                         collector_key_from_pem(collector_pub.read_bytes()))


def mqtt_settings(port: int, ca_file: str, gateway_dir: Path, client_id: str) -> MqttSettings:
    return MqttSettings(host="127.0.0.1", port=port, ca_file=ca_file, cert_file=str(gateway_dir / "tls.crt"),
                        key_file=str(gateway_dir / "tls.key"), client_id=client_id, reconnect_max=2)


def meter_fields(fields: int, salt: int) -> dict[str, float]:
    return {f"v{k}": 230.0 + ((salt * 7 + k * 13) % 1000) / 10 for k in range(fields)}


# -- what A sends -----------------------------------------------------------------------------------------------


class FloodPayloads:
    """Payload pools for gateway A, built before the clock starts so that the flood costs A little CPU.

    valid: batches of `readings` readings (`devices` devices x readings/devices sample times, `fields` float
      fields each, measurement flood_a), i.e. `devices` series, within the default budgets (new_devices 200,
      new_series 2000). `blocks` distinct readings blocks are encoded once; each message is a new Batch (its own
      seq and sent_ns) around one of them, sealed with a fresh counter when it is sent. Sample times are one day
      old, 1 ms apart (valid for validation.max_past), and repeat every `blocks` messages: InfluxDB overwrites.
    garbage: random bytes, 16..4096 long (the first byte random too: most are not even a known format).
    forged: sealed-format payloads of A's own gateway id and collector key id, a random session id and a random
      signature: each is a new session announcement that fails Ed25519 verification (bad_signature).
    """

    def __init__(self, gateway_id: str, sealer: GatewaySealer, *, readings: int = 5000, devices: int = 100,
                 fields: int = 10, blocks: int = 16, pool: int = 1024, seed: int = 1) -> None:
        self.gateway_id = gateway_id
        self.sealer = sealer
        self.topic = topics.up(PREFIX, gateway_id)
        self.readings = readings
        rng = random.Random(seed)
        base = (time.time_ns() // 10**9 - 86400) * 10**9
        per_device = max(1, readings // devices)
        self._blocks = []
        for b in range(blocks):
            t0 = base + b * per_device * 1_000_000
            block = [Reading(f"a-meter-{j % devices:03d}", "flood_a", t0 + (j // devices) * 1_000_000,
                             meter_fields(fields, b * readings + j)) for j in range(readings)]
            self._blocks.append(_msgpack.encode(block))
        self._gateway = _msgpack.encode(gateway_id)
        self.garbage = [rng.randbytes(rng.randint(16, 4096)) for _ in range(pool)]
        template = sealer.seal(self.topic, encode_batch(Batch(gateway_id, 0, time.time_ns(), [
            Reading(f"a-meter-{j:03d}", "flood_a", time.time_ns(), meter_fields(fields, j)) for j in range(30)])))
        gw_end = 2 + len(gateway_id.encode())
        sid_at = gw_end + KID_LEN
        sig_at = gw_end + _ANNOUNCEMENT_LEN - 64
        self.forged = []
        for _ in range(pool):
            forged = bytearray(template)
            forged[sid_at:sid_at + SID_LEN] = rng.randbytes(SID_LEN)
            forged[sig_at:sig_at + 64] = rng.randbytes(64)
            self.forged.append(bytes(forged))
        self._seq = 0

    def valid_size(self) -> int:
        return len(self._blocks[0]) + 40

    def stream(self, kind: str) -> Iterator[bytes]:
        if kind == "valid":
            while True:
                for block in self._blocks:
                    self._seq += 1
                    head = b"\x94" + self._gateway + _msgpack.encode(self._seq) + _msgpack.encode(time.time_ns())
                    yield self.sealer.seal(self.topic, head + block)
        pool = {"garbage": self.garbage, "forged": self.forged}[kind]
        while True:
            yield from pool


class Flooder:
    """Gateway A's connection: QoS 1 publishes as fast as the broker acknowledges them, `window` in flight."""

    def __init__(self, settings: MqttSettings, gateway_id: str, window: int) -> None:
        self.window = window
        self.settings = settings
        self.gateway_id = gateway_id

    def run(self, payloads: Iterator[bytes], topic: str, seconds: float, rate: float = 0.0) -> dict:
        """Publish for `seconds`; `rate` > 0 caps it at that many messages per second (as a per-gateway limit at
        the broker would), else as fast as the broker acknowledges."""
        free = threading.Semaphore(self.window)
        acked = [0]

        def on_published(_mid: int) -> None:
            acked[0] += 1
            free.release()

        link = MqttLink(self.settings, self.gateway_id, max_inflight=self.window, on_published=on_published)
        link.start()
        if not link.connected.wait(15):
            raise RuntimeError(f"gateway {self.gateway_id} could not connect: {link.last_error}")
        sent = sent_bytes = 0
        cpu0 = time.process_time()
        start = time.monotonic()
        deadline = start + seconds
        next_at = start
        while time.monotonic() < deadline:
            if rate > 0:
                next_at += 1.0 / rate
                ahead = next_at - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            if not free.acquire(timeout=0.2):
                continue
            payload = next(payloads)
            info = link.publish(topic, payload, qos=1)
            if info.rc != 0:
                free.release()
                time.sleep(0.05)
                continue
            sent += 1
            sent_bytes += len(payload)
        elapsed = time.monotonic() - start
        drain_deadline = time.monotonic() + 10
        while acked[0] < sent and time.monotonic() < drain_deadline:
            time.sleep(0.02)
        link.stop()
        return {"sent": sent, "acked_by_broker": acked[0], "bytes": sent_bytes, "seconds": round(elapsed, 2),
                "messages_per_s": round(sent / elapsed), "mb_per_s": round(sent_bytes / elapsed / 1e6, 1),
                "cpu_s": round(time.process_time() - cpu0, 1)}


# -- B: the gateway that must not starve --------------------------------------------------------------------------


@dataclass
class Sent:
    seq: int
    sample_ns: int
    body: bytes
    published: float  # wall time of the (last) publish
    sends: int = 1
    puback_s: float | None = None  # first publish -> broker's PUBACK
    acked_s: float | None = None  # first publish -> end-to-end acknowledgement (stored)


class SteadyGateway(threading.Thread):
    """Gateway B as an agent behaves on the wire: every `interval` one sealed QoS 1 message of `readings`
    readings (devices b-meter-00.., measurement flood_b), all stamped with the time they were made; end-to-end
    acknowledgements opened with its sealer; a message not acknowledged within `ack_timeout` sent again (same
    seq, new seal counter), as edge_agent does after uplink.ack_timeout (default 30 s)."""

    def __init__(self, settings: MqttSettings, gateway_id: str, sealer: GatewaySealer, *, readings: int = 30,
                 fields: int = 10, interval: float = 1.0, ack_timeout: float = 30.0) -> None:
        super().__init__(name="gateway-b", daemon=True)
        self.gateway_id = gateway_id
        self.sealer = sealer
        self.readings = readings
        self.fields = fields
        self.interval = interval
        self.ack_timeout = ack_timeout
        self.topic = topics.up(PREFIX, gateway_id)
        self.ack_topic = topics.down(PREFIX, gateway_id, ack.KIND)
        self.sent: dict[int, Sent] = {}
        self.lock = threading.Lock()
        self.resent = 0
        self.sending = True  # False: no new messages, only re-sends and acknowledgements (the final wait)
        self.stop_event = threading.Event()
        self._downlinks: queue.SimpleQueue[tuple[bytes, float]] = queue.SimpleQueue()
        self._mids: dict[int, int] = {}
        self._puback_at: dict[int, float] = {}
        self.link = MqttLink(settings, gateway_id, on_connected=self._on_connected,
                             on_message=lambda m: self._downlinks.put((bytes(m.payload), time.time())),
                             on_published=self._on_published, max_inflight=20)

    def _on_connected(self, _present: bool) -> None:
        self.link.subscribe([self.ack_topic], qos=1)

    def _on_published(self, mid: int) -> None:
        self._puback_at[mid] = time.time()

    def connect(self) -> None:
        self.link.start()
        if not self.link.connected.wait(15):
            raise RuntimeError(f"gateway {self.gateway_id} could not connect: {self.link.last_error}")

    def run(self) -> None:
        seq = 0
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            self._handle_downlinks()
            now = time.monotonic()
            if now < next_at:
                self.stop_event.wait(min(0.05, next_at - now))
                continue
            next_at += self.interval
            if not self.sending:
                self._resend_overdue()
                continue
            seq += 1
            sample_ns = time.time_ns()
            batch = Batch(self.gateway_id, seq, sample_ns, [
                Reading(f"b-meter-{j:02d}", "flood_b", sample_ns, meter_fields(self.fields, seq * 100 + j))
                for j in range(self.readings)])
            body = encode_batch(batch)
            entry = Sent(seq, sample_ns, body, time.time())
            with self.lock:
                self.sent[seq] = entry
            self._publish(entry)
            self._resend_overdue()

    def _publish(self, entry: Sent) -> None:
        info = self.link.publish(self.topic, self.sealer.seal(self.topic, entry.body), qos=1)
        if entry.sends == 1:
            self._mids[info.mid] = entry.seq

    def _resend_overdue(self) -> None:
        now = time.time()
        with self.lock:
            overdue = [e for e in self.sent.values() if e.acked_s is None and now - e.published >= self.ack_timeout]
        for entry in overdue:
            entry.sends += 1
            entry.published = now
            self.resent += 1
            self._publish(entry)

    def _handle_downlinks(self) -> None:
        for mid, at in list(self._puback_at.items()):
            seq = self._mids.pop(mid, None)
            if seq is None:
                continue  # the PUBACK came before publish() returned its mid: next time
            del self._puback_at[mid]
            if seq in self.sent and self.sent[seq].puback_s is None:
                self.sent[seq].puback_s = at - self.sent[seq].sample_ns / 1e9
        while True:
            try:
                payload, at = self._downlinks.get_nowait()
            except queue.Empty:
                return
            try:
                ranges = ack.decode_ack(self.sealer.open_downlink(self.ack_topic, payload))
            except Exception:  # a bad acknowledgement is counted by its absence
                continue
            with self.lock:
                for first, last in ranges:
                    for seq in range(first, last + 1):
                        entry = self.sent.get(seq)
                        if entry is not None and entry.acked_s is None:
                            entry.acked_s = at - entry.sample_ns / 1e9

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)
        self._handle_downlinks()

    def unacknowledged(self) -> int:
        with self.lock:
            return sum(1 for e in self.sent.values() if e.acked_s is None)

    def close(self) -> None:
        self.link.stop()

    def snapshot(self) -> list[Sent]:
        with self.lock:
            return list(self.sent.values())


class StoreWatch(threading.Thread):
    """Polls InfluxDB every `interval` for B's points newer than the oldest sample time not yet fully seen;
    a point's store time is the wall time of the response of the first poll that returned it (so at most one
    interval plus the query's own duration late)."""

    def __init__(self, influx, db: str, gateway: SteadyGateway, interval: float = 0.1) -> None:
        super().__init__(name="store-watch", daemon=True)
        self.influx = influx
        self.db = db
        self.gateway = gateway
        self.interval = interval
        self.seen: dict[tuple[str, int], float] = {}
        self._per_sample: dict[int, int] = {}  # sample time -> points seen
        self.query_s: list[float] = []
        self.errors = 0
        self.stop_event = threading.Event()

    def _low_water(self) -> int | None:
        counts = self._per_sample
        missing = [e.sample_ns for e in self.gateway.snapshot() if counts.get(e.sample_ns, 0) < self.gateway.readings]
        return min(missing) if missing else None

    def poll(self) -> None:
        low = self._low_water()
        if low is None:
            return
        t0 = time.time()
        try:
            rows = self.influx.query(f'SELECT "v0", "device" FROM "flood_b" WHERE time >= {low}', self.db)
        except Exception:  # a slow or failed poll is counted; the next one catches up
            self.errors += 1
            return
        t1 = time.time()
        self.query_s.append(t1 - t0)
        for row in rows:
            key = (row["device"], row["time"])
            if key not in self.seen:
                self.seen[key] = t1
                self._per_sample[row["time"]] = self._per_sample.get(row["time"], 0) + 1

    def run(self) -> None:
        while not self.stop_event.is_set():
            start = time.monotonic()
            self.poll()
            self.stop_event.wait(max(0.0, self.interval - (time.monotonic() - start)))

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)

    def latencies(self) -> dict[int, list[float]]:
        """Sample time -> each seen point's latency (s)."""
        out: dict[int, list[float]] = {}
        for (_device, t), seen in self.seen.items():
            out.setdefault(t, []).append(seen - t / 1e9)
        return out


# -- the collector process ---------------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """VmRSS of `pid` every `interval` s, as (wall time, kB); `reset_peak()` resets VmHWM (clear_refs 5)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(name=f"rss-{pid}", daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.samples.append((time.time(), status_kb(self.pid)["VmRSS"]))
            except (OSError, KeyError):
                return
            self._halt.wait(self.interval)

    def reset_peak(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def peak_kb(self, t0: float, t1: float) -> int:
        return max((kb for t, kb in self.samples if t0 <= t < t1), default=0)

    def stop(self) -> None:
        self._halt.set()
        self.join(2)


def status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_STATS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z \S+\s+citynerve\.collector: stats: (.*)$")


def stats_lines(log_text: str) -> list[tuple[float, dict[str, int]]]:
    """(wall time, cumulative counters) of each "stats:" line of a text-format collector log."""
    out = []
    for line in log_text.splitlines():
        m = _STATS.match(line)
        if not m:
            continue
        stamp = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) + int(m.group(2)) / 1000
        counters = {}
        for part in m.group(3).split():
            key, _, value = part.partition("=")
            if value.lstrip("-").isdigit():
                counters[key] = int(value)
        out.append((stamp, counters))
    return out


def counters_between(lines: list[tuple[float, dict[str, int]]], t0: float, t1: float) -> dict[str, int]:
    """What the cumulative counters grew by from the last line at or before t0 to the last at or before t1."""
    before = next((c for t, c in reversed(lines) if t <= t0), {})
    after = next((c for t, c in reversed(lines) if t <= t1), {})
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
