"""Serial meters and sensors end to end: real captured frames written into ptys at the device's rate, one agent
process reading every port, the collector, InfluxDB. What is stored equals the golden expectations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labkit import stack
from labkit.influxd import InfluxdServer
from labkit.serial_devices import QueryDevice, StreamingDevice
from tests.test_e2e import wait_until
from tests.test_serial_sensors import frames

pytestmark = pytest.mark.integration

GOLDEN = Path(__file__).parent / "golden"


def sensor_expectations(name: str) -> list[dict]:
    return json.loads((GOLDEN / "serial_sensors" / "expected.json").read_text())[name]["samples"]


def collector_for(tmp_path: Path, mosquitto, influxd: InfluxdServer, db: str):
    # Captured devices state times from years ago: accept them as they are for this test.
    return stack.collector_process(stack.write_collector_config(
        tmp_path / "collector.toml", stack.mqtt_section(mosquitto, client_id="collector-serial"),
        {"api": "v1", "url": influxd.url, "database": db},
        validation={"min_time": "1990-01-01T00:00:00Z", "max_future": "3650d", "max_past": "0s"},
    )).start()


def test_every_serial_protocol_from_a_pty_into_influxdb(tmp_path: Path, mosquitto, influxd: InfluxdServer,
                                                         influx_db: str) -> None:
    sds = StreamingDevice(frames("sds011"), period=0.3)
    pms = StreamingDevice(frames("pmsx003"), period=0.3)
    co2_answers = frames("mhz19b")
    answered: list[bytes] = []

    def mhz19b(request: bytes) -> bytes | None:
        if request != b"\xff\x01\x86\x00\x00\x00\x00\x00\x79":
            return None
        answer = co2_answers[len(answered) % len(co2_answers)]
        answered.append(answer)
        return answer

    co2 = QueryDevice(mhz19b)
    weather = StreamingDevice([b"T=21.4C H=45% P=1013.2hPa\r\n", b"T=21.6C H=44% P=1013.1hPa\r\n"], period=0.3)
    devices = [
        {"kind": "serial", "id": "pm-sds", "port": sds.device, "protocol": "sds011", "tags": {"site": "roof"}},
        {"kind": "serial", "id": "pm-pms", "port": pms.device, "protocol": "pmsx003"},
        {"kind": "serial", "id": "co2", "port": co2.device, "protocol": "mhz19b", "interval": "1s"},
        {"kind": "serial", "id": "weather", "port": weather.device, "protocol": "ascii", "measurement": "weather",
         "ascii": {"regex": r"^T=(?P<temperature>-?\d+\.\d+)C H=(?P<humidity>\d+)% P=(?P<pressure>\d+\.\d+)hPa$"}},
    ]
    collector = collector_for(tmp_path, mosquitto, influxd, influx_db)
    agent = stack.agent_process(stack.write_agent_config(
        tmp_path / "agent.toml", "gw-serial", stack.mqtt_section(mosquitto), devices))
    try:
        agent.start()

        def count(device: str, measurement: str) -> int:
            rows = influxd.query(f'SELECT * FROM "{measurement}" WHERE device = \'{device}\' GROUP BY *', influx_db)
            return len(rows)

        wait_until(lambda: all(count(d, m) >= 3 for d, m in [("pm-sds", "air_quality"), ("pm-pms", "air_quality"),
                                                               ("co2", "air_quality"), ("weather", "weather")]),
                   25, "3 readings from every serial device")
        rows = {d: influxd.query(f'SELECT * FROM "{m}" WHERE device = \'{d}\' GROUP BY *', influx_db)
                for d, m in [("pm-sds", "air_quality"), ("pm-pms", "air_quality"), ("co2", "air_quality"),
                             ("weather", "weather")]}
    finally:
        agent.stop()
        collector.stop()
        for device in (sds, pms, co2, weather):
            device.close()

    # every stored sample is one of the capture's frames, decoded as the golden file says
    for device, capture in (("pm-sds", "pypms_SDS01x.hexdump"), ("pm-pms", "pypms_PMSx003.hexdump"),
                            ("co2", "pypms_MHZ19B.hexdump")):
        expected = [s["fields"] for s in sensor_expectations(capture)]
        for row in rows[device]:
            stored = {k: row[k] for k in expected[0]}
            assert stored in expected, (device, stored)
    assert rows["pm-sds"][0]["site"] == "roof" and rows["pm-sds"][0]["sensor_id"] == "58D9"
    assert len(answered) >= 3  # the CO2 sensor was queried every interval
    for row in rows["weather"]:
        assert (row["temperature"], row["humidity"], row["pressure"]) in [(21.4, 45.0, 1013.2), (21.6, 44.0, 1013.1)]
    assert "Traceback" not in agent.log_path.read_text()


def test_nmea_gps_from_a_pty_into_influxdb(tmp_path: Path, mosquitto, influxd: InfluxdServer, influx_db: str) -> None:
    from edge_agent.serial.nmea import NmeaDecoder

    sentences = [b"$GPGGA,184353.07,1929.045,S,02410.506,E,1,04,2.6,100.00,M,-33.9,M,,0000*6D\r\n",
                 b"$GPRMC,225446,A,4916.45,N,12311.12,W,000.5,054.7,191194,020.3,E*68\r\n"]
    expected = [e for e in NmeaDecoder().feed(b"".join(sentences)) if hasattr(e, "fields")]
    assert len(expected) == 2  # the decoder itself is held to golden data in tests/test_nmea.py
    gps = StreamingDevice(sentences, period=0.3)
    collector = collector_for(tmp_path, mosquitto, influxd, influx_db)
    agent = stack.agent_process(stack.write_agent_config(
        tmp_path / "agent.toml", "gw-gps", stack.mqtt_section(mosquitto),
        [{"kind": "serial", "id": "gps-1", "port": gps.device, "protocol": "nmea", "baud": 4800}]))
    try:
        agent.start()
        rows = wait_until(lambda: (r := influxd.query('SELECT * FROM "gps" GROUP BY *', influx_db)) and len(r) >= 2 and r,
                          20, "GGA and RMC samples")
    finally:
        agent.stop()
        collector.stop()
        gps.close()
    rmc = next(e for e in expected if e.time_ns)
    stored_rmc = [r for r in rows if r["time"] == rmc.time_ns]
    assert stored_rmc, "the RMC fix is stored at its own UTC time (1994-11-19 22:54:46)"
    assert stored_rmc[0]["latitude"] == pytest.approx(rmc.fields["latitude"])
    gga = next(e for e in expected if not e.time_ns)
    assert any(r.get("altitude") == gga.fields["altitude"] and r["latitude"] == pytest.approx(gga.fields["latitude"])
               for r in rows)


def test_iec62056_21_meter_behind_an_optical_head_into_influxdb(tmp_path: Path, mosquitto, influxd: InfluxdServer,
                                                                 influx_db: str) -> None:
    """Sign-on, identification, option select with a baud switch, readout with BCC - every interval."""
    from edge_agent.serial.iec62056_21 import Iec62056ReadoutDecoder
    from tests.test_iec62056_21 import SimMeter

    meter = SimMeter()
    expected = [e for e in Iec62056ReadoutDecoder().feed(meter.ident + meter.readout) if hasattr(e, "fields")]
    assert len(expected) == 1 and expected[0].fields

    def optical_head(request: bytes) -> bytes | None:
        return b"".join(data for data, _baud in meter.receive(request, meter.baud)) or None  # a pty has no baud

    head = QueryDevice(optical_head)
    collector = collector_for(tmp_path, mosquitto, influxd, influx_db)
    agent = stack.agent_process(stack.write_agent_config(
        tmp_path / "agent.toml", "gw-iec", stack.mqtt_section(mosquitto),
        [{"kind": "serial", "id": "landis-1", "port": head.device, "protocol": "iec62056-21", "interval": "2s"}]))
    try:
        agent.start()
        rows = wait_until(lambda: (r := influxd.query('SELECT * FROM "electricity" GROUP BY *', influx_db))
                          and len(r) >= 2 and r, 25, "two readouts")
    finally:
        agent.stop()
        collector.stop()
        head.close()
    for row in rows:
        assert {k: row[k] for k in expected[0].fields} == expected[0].fields
        assert row["device"] == "landis-1" and row["manufacturer"] == expected[0].tags["manufacturer"]
    assert any(r.startswith(b"/?") for r in head.requests) and any(r[:1] == b"\x06" for r in head.requests)


def test_dsmr_p1_telegrams_with_mbus_submeters_into_influxdb(tmp_path: Path, mosquitto, influxd: InfluxdServer,
                                                              influx_db: str) -> None:
    """A DSMR 5.0 meter with two M-Bus sub-meters, one telegram per period on the P1 port; the electricity
    reading at the telegram's own time, the sub-meters at their capture times - as the golden file says."""
    name = "dsmr50_iskra_am550_two_mbus"
    telegram = (GOLDEN / "dsmr" / f"{name}.txt").read_bytes()
    golden = [e for e in json.loads((GOLDEN / "dsmr" / f"{name}.json").read_text())["events"] if "fields" in e]
    p1 = StreamingDevice([telegram], period=0.3, chunk=32)
    collector = collector_for(tmp_path, mosquitto, influxd, influx_db)
    agent = stack.agent_process(stack.write_agent_config(
        tmp_path / "agent.toml", "gw-p1", stack.mqtt_section(mosquitto),
        [{"kind": "serial", "id": "p1", "port": p1.device, "protocol": "dsmr"}]))
    measurements = {e["measurement"] or "electricity" for e in golden}
    try:
        agent.start()

        def stored() -> dict[str, list[dict]]:
            return {m: influxd.query(f'SELECT * FROM "{m}" GROUP BY *', influx_db) for m in measurements}

        rows = wait_until(lambda: (r := stored()) and all(r.values()) and r, 20, "every measurement of the telegram")
    finally:
        agent.stop()
        collector.stop()
        p1.close()
    for event in golden:
        measurement = event["measurement"] or "electricity"
        matching = [r for r in rows[measurement] if r["time"] == event["time_ns"]]
        assert matching, (measurement, event["time_ns"])
        # the same telegram repeated lands on the same point: stored once, whatever the repeats
        assert len(matching) == 1
        assert {k: matching[0][k] for k in event["fields"]} == event["fields"]
        assert matching[0]["device"] == "p1"
