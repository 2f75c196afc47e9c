"""DSMR P1: framing, CRC-16/ARC, OBIS fields, M-Bus sub-meters, DSMR times; golden telegrams from dsmr_parser,
every split, garbage, bit flips and Hypothesis junk."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.serial import obis
from edge_agent.serial.base import Rejected, Sample
from edge_agent.serial.dsmr import MAX_BUFFER, DsmrDecoder, crc16_arc, eu_summer_time, timestamp_ns
from wire import vocabulary

GOLDEN = Path(__file__).parent / "golden" / "dsmr"
WRITE = os.environ.get("CITYNERVE_WRITE_GOLDEN") == "1"
FILES = sorted(p.name for p in GOLDEN.glob("*.txt"))
WITH_CRC = [name for name in FILES if not name.startswith(("dsmr22", "dsmr30", "easymeter"))]


def fixture(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def decode(data: bytes, **kwargs) -> list:
    decoder = DsmrDecoder(**kwargs)
    return decoder.feed(data) + decoder.flush()


def samples(events: list) -> list[Sample]:
    return [e for e in events if isinstance(e, Sample)]


def rejections(events: list) -> list[tuple[str, int, int]]:
    return [(e.reason, e.offset, e.length) for e in events if isinstance(e, Rejected)]


def utc(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * 1_000_000_000


def iso(ns: int | None) -> str | None:
    return None if ns is None else datetime.fromtimestamp(ns // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_json(event) -> dict:
    if isinstance(event, Rejected):
        return {"rejected": event.reason, "offset": event.offset, "length": event.length}
    return {"measurement": event.measurement, "time": iso(event.time_ns), "time_ns": event.time_ns,
            "fields": event.fields, "units": event.units, "tags": event.tags, "quality": event.quality}


def telegram(*lines: str, header: str = "XMX5TEST", crc: str | None = "auto", eol: str = "\r\n") -> bytes:
    """A telegram from data lines; crc "auto": the right 4 digits, None: none, else the given text."""
    body = f"/{header}{eol}{eol}" + "".join(line + eol for line in lines) + "!"
    digits = f"{crc16_arc(body.encode('latin-1')):04X}" if crc == "auto" else (crc or "")
    return (body + digits + eol).encode("latin-1")


def bang_end(data: bytes) -> int:
    """The index just after the CRC digits of the (first) telegram in `data`."""
    end = data.index(b"!") + 1
    while end < len(data) and data[end] in b"0123456789ABCDEF":
        end += 1
    return end


# -- CRC ----------------------------------------------------------------------------------------------------------


def test_crc16_arc_check_value_and_continuation():
    assert crc16_arc(b"123456789") == 0xBB3D  # the catalogue's check value for CRC-16/ARC
    assert crc16_arc(b"") == 0
    assert crc16_arc(b"56789", crc16_arc(b"1234")) == 0xBB3D


def test_index_crcs_match_the_fixtures():
    with (GOLDEN / "INDEX.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["file"] for r in rows) == FILES
    for row in rows:
        data = fixture(row["file"])
        assert data.startswith(row["header"].encode("latin-1") + b"\r\n")
        bang = data.index(b"!")
        assert f"{crc16_arc(data[:bang + 1]):04X}" == row["crc16_arc_computed"], row["file"]
        assert data[bang + 1:bang_end(data)].decode() == row["crc_in_telegram"]


# -- golden -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_golden_telegram(name: str):
    decoder = DsmrDecoder()
    events = decoder.feed(fixture(name)) + decoder.flush()
    got = {"events": [as_json(e) for e in events], "unknown": dict(decoder.unknown), "stats": dict(decoder.stats)}
    path = GOLDEN / name.replace(".txt", ".json")
    if WRITE:
        path.write_text(json.dumps(got, indent=1, ensure_ascii=False) + "\n")
    assert got == json.loads(path.read_text())


def test_all_fixtures_as_one_stream():
    stream = b"".join(fixture(name) for name in FILES)
    expected = [e for name in FILES for e in samples(decode(fixture(name)))]
    events = decode(stream)
    assert samples(events) == expected
    offset = sum(len(fixture(name)) for name in FILES[:FILES.index("easymeter_q3d_via_com1_gateway_trailing_garbage.txt")])
    assert rejections(events) == [("garbage", offset + 299, 45)]


# -- values, checked by hand against the telegram text -----------------------------------------------------------


def test_dsmr42_kaifa_by_hand():
    [e, gas] = decode(fixture("dsmr42_kaifa.txt"))
    assert e.measurement is None and e.time_ns == utc("2016-11-13T19:57:57")  # 161113205757W: CET = UTC+1
    assert e.tags == {"dsmr_version": "42", "equipment_id": "3960221976967177082151037881335713"}
    f = e.fields
    assert (f["energy_import_t1"], f["energy_import_t2"], f["energy_export_t1"]) == (1581.123, 1435.706, 0.0)
    assert (f["tariff"], f["power_import"], f["power_export"]) == (2, 2027.0, 0.0)  # 02.027*kW: the vocabulary's W
    assert (f["power_failures"], f["power_failures_long"], f["voltage_sags_l1"], f["voltage_swells_l3"]) == (15, 7, 0, 0)
    assert (f["current_l1"], f["current_l2"], f["current_l3"]) == (0.0, 6.0, 2.0)
    assert (f["power_import_l1"], f["power_import_l2"], f["power_import_l3"]) == (170.0, 1247.0, 209.0)
    assert isinstance(f["current_l1"], float) and isinstance(f["power_failures"], int)
    assert e.units["energy_import_t1"] == "kWh" and e.units["current_l2"] == "A" and "tariff" not in e.units
    assert e.units["power_import"] == "W"
    assert gas.measurement == "gas" and gas.time_ns == utc("2016-11-29T19:00:00")  # 161129200000W
    assert gas.fields == {"volume": 981.443} and gas.units == {"volume": "m³"}
    assert gas.tags == {"channel": "1", "device_type": "3", "equipment_id": "4819243993373755377509728609491464"}


def test_dsmr22_gas_value_on_the_next_line_and_no_telegram_time():
    [e, gas] = decode(fixture("dsmr22_iskra_mt382.txt"))
    assert e.time_ns is None  # DSMR 2.2 has no 0-0:1.0.0: the gateway stamps it
    assert e.fields["limiter_threshold"] == 999000.0 and e.fields["breaker_state"] == 1  # 0999.00*kW
    assert gas.fields == {"volume": 1.001, "valve_position": 1}
    assert gas.time_ns == utc("2016-11-07T18:00:00")  # 161107190000, no S/W: November is winter time
    [_, gas3] = decode(fixture("dsmr30_iskra_mt382.txt"))
    assert gas3.time_ns == utc("2009-02-12T15:00:00") and gas3.fields["volume"] == 1.001


def test_dsmr30_limiter_in_amperes():
    [e, _] = decode(fixture("dsmr30_iskra_mt382.txt"))
    assert e.fields["current_threshold"] == 16.0 and e.units["current_threshold"] == "A"
    assert "limiter_threshold" not in e.fields


def test_fluvius_demand_water_and_uncorrected_gas():
    [e, gas, water] = decode(fixture("fluvius_emucs_v171.txt"))
    assert e.time_ns == utc("2020-05-12T11:54:09")  # 200512135409S: CEST = UTC+2
    assert e.tags == {"emucs_version": "50217", "equipment_id": "3153414733313031303231363035"}
    assert (e.fields["demand_power"], e.fields["demand_power_max"]) == (2351.0, 2589.0)
    assert e.fields["demand_power_max_time"] == "2020-05-09T11:45:58Z"  # 200509134558S
    assert e.fields["current_threshold_l1"] == 999.0 and e.fields["limiter_threshold"] == 999900.0
    assert gas.measurement == "gas" and gas.time_ns == utc("2020-05-12T11:45:58")
    assert gas.fields == {"volume_uncorrected": 112.384, "valve_position": 1}
    assert gas.tags == {"channel": "1", "device_type": "3", "equipment_id": "37464C4F32313139303333373333"}
    assert water.measurement == "water" and water.fields == {"volume": 872.234}
    assert water.tags["channel"] == "2" and water.time_ns == utc("2020-05-12T11:45:58")


def test_sagemcom_wh_and_w_are_converted_exactly():
    [e] = decode(fixture("sagemcom_t210_d_r.txt"))
    assert e.fields["energy_import"] == 6545.766  # 006545766*Wh
    assert e.fields["energy_import_t1"] == 5017.12 and e.fields["power_import"] == 286.0  # 000000286*W
    assert e.fields["reactive_energy_export"] == 3897.726 and e.fields["reactive_power_export"] == 166.0
    assert e.units["energy_import"] == "kWh" and e.units["reactive_power_export"] == "var"
    assert e.time_ns == utc("2022-10-06T13:50:14")


def test_warmtelink_heat_from_a_gateway_without_electricity():
    [heat] = decode(fixture("dsmr50_warmtelink_unpadded_crc.txt"))  # no electricity sample: nothing to report
    # 240.86 GJ = 240.86e9 J / 3.6e6 J per kWh, the vocabulary's unit
    assert heat.measurement == "heat" and heat.fields == {"energy": 66905.55555555556} and heat.units == {"energy": "kWh"}
    assert heat.time_ns == utc("2026-02-15T19:05:23")
    assert heat.tags == {"channel": "1", "device_type": "4", "equipment_id": "621848012D2C0B0C"}


def test_empty_and_placeholder_mbus_channels_give_no_sample():
    decoder = DsmrDecoder()
    [_, gas] = decoder.feed(fixture("dsmr50_iskra_am550_two_mbus.txt"))
    assert gas.tags["channel"] == "2" and gas.fields == {"volume": 246.138}
    assert gas.time_ns == utc("2020-04-26T20:30:01")
    assert decoder.stats["mbus_no_reading"] == 1  # channel 1: (700101010000W)(00000000)
    events = decode(fixture("dsmr50_iskra_mt382.txt"))  # channel 2: type and empty id, no reading
    assert [s.tags["channel"] for s in events[1:]] == ["1"]


def test_easymeter_f255_codes_watts_and_unknown_codes():
    decoder = DsmrDecoder()
    data = fixture("easymeter_q3d_via_com1_gateway_trailing_garbage.txt")
    [e, garbage] = decoder.feed(data) + decoder.flush()
    assert e.fields == {"energy_import": 52185.7825309, "energy_export": 19949.3221493,
                        "power_import_l1": 747.85, "power_import_l2": 737.28, "power_import_l3": 639.73,
                        "power_import": 2124.86}
    assert decoder.unknown == {"1-0:0.0.0": 1, "1-0:96.5.5": 1, "0-0:96.1.255": 1}
    assert decoder.stats["unknown_lines"] == 3
    assert garbage.reason == "garbage"
    assert data[garbage.offset:garbage.offset + garbage.length] == b"  25803103\r\n" + b"\xff" * 33


# -- CRC cases ----------------------------------------------------------------------------------------------------


def test_bad_crc_rejected_with_its_offset_between_good_telegrams():
    good = fixture("dsmr42_kaifa.txt")
    bad = good.replace(b"!6796", b"!6797")
    events = decode(good + bad + good)
    assert rejections(events) == [("crc", len(good), len(bad))]
    assert samples(events) == samples(decode(good)) * 2
    assert "says 6797, computed 6796" in next(e.detail for e in events if isinstance(e, Rejected))


def test_changed_value_fails_the_crc():
    bad = fixture("dsmr42_kaifa.txt").replace(b"001581.123", b"001581.124")
    assert rejections(decode(bad)) == [("crc", 0, len(bad))]


def test_three_digit_crc_accepted_when_its_value_matches():
    data = fixture("dsmr50_warmtelink_unpadded_crc.txt")
    assert b"!B9F\r\n" in data
    padded = data.replace(b"!B9F", b"!0B9F")
    assert samples(decode(padded)) == samples(decode(data))
    for wrong in (b"!B9E", b"!9F", b"!0B9", b"!B9F0"):
        assert [r[0] for r in rejections(decode(data.replace(b"!B9F", wrong)))][:1] == ["crc"], wrong


def test_lower_case_crc_digits_accepted():
    data = fixture("fluvius_emucs_v171.txt")
    assert samples(decode(data.replace(b"!3AD7", b"!3ad7"))) == samples(decode(data))


@pytest.mark.parametrize("name", WITH_CRC)
def test_missing_crc_on_dsmr4_and_later_is_crc(name: str):
    data = fixture(name)
    end = bang_end(data)
    stripped = data[:data.index(b"!") + 1] + data[end:]
    assert rejections(decode(stripped)) == [("crc", 0, len(stripped))]


def test_require_crc_rejects_dsmr22():
    data = fixture("dsmr22_iskra_mt382.txt")
    assert len(samples(decode(data))) == 2
    assert rejections(decode(data, require_crc=True)) == [("crc", 0, len(data))]


def test_single_bit_flips_in_the_protected_bytes_never_give_a_sample():
    """Every bit of the small telegrams, a sample of bits of the others, each flipped telegram between two good
    ones: the flipped one is rejected (crc, truncated, malformed, or its bytes become garbage), both neighbours
    still decode. The one exception: a CRC letter flipped to lower case is the same value (data untouched)."""
    rng = random.Random(1)
    for name in WITH_CRC:
        good = fixture(name)
        expected = samples(decode(good))
        end = bang_end(good)
        bits = [(i, b) for i in range(end) for b in range(8)]
        if len(good) > 500:
            bits = rng.sample(bits, 200)
        for i, b in bits:
            bad = bytearray(good)
            bad[i] ^= 1 << b
            events = decode(good + bytes(bad) + good)
            got = samples(events)
            case_only = i > good.index(b"!") and chr(good[i]) in "ABCDEF" and b == 5
            assert got == expected * (3 if case_only else 2), (name, i, b)
            if not case_only:
                assert rejections(events), (name, i, b)


def test_bit_flips_after_the_crc_do_not_touch_the_data():
    good = fixture("dsmr42_kaifa.txt")
    expected = samples(decode(good))
    end = bang_end(good)
    for i in range(end, len(good)):
        for b in range(8):
            bad = bytearray(good)
            bad[i] ^= 1 << b
            assert samples(decode(good + bytes(bad) + good)) == expected * 3


# -- framing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_every_split_gives_the_same_events(name: str):
    data = fixture(name)
    whole = decode(data)
    for p in range(1, len(data)):
        decoder = DsmrDecoder()
        assert decoder.feed(data[:p]) + decoder.feed(data[p:]) + decoder.flush() == whole, p
    decoder = DsmrDecoder()
    assert [e for byte in data for e in decoder.feed(bytes([byte]))] + decoder.flush() == whole


def test_garbage_between_telegrams_is_counted_and_skipped():
    a, b = fixture("dsmr42_kaifa.txt"), fixture("fluvius_emucs_v171.txt")
    junk1, junk2 = b"\x00\xffnoise!1234", b"\r\nABC!\r\n\r\n"
    stream = junk1 + a + junk2 + b + b"\r\n\r\n"
    events = decode(stream)
    assert samples(events) == samples(decode(a)) + samples(decode(b))
    assert rejections(events) == [("garbage", 0, len(junk1)), ("garbage", len(junk1) + len(a) + 2, 4)]


def test_a_new_slash_truncates_a_telegram_and_resynchronises():
    good = fixture("dsmr50_iskra_mt382.txt")
    torn = good[:400]  # the UART lost the rest
    events = decode(b"\xff/x" + torn + good)
    assert rejections(events) == [("garbage", 0, 1), ("truncated", 1, 2), ("truncated", 3, 400)]
    assert samples(events) == samples(decode(good))


def test_lf_only_line_ends_are_accepted():
    crlf = telegram("1-3:0.2.8(50)", "0-0:1.0.0(240101120000W)", "1-0:1.8.1(000001.500*kWh)")
    lf = telegram("1-3:0.2.8(50)", "0-0:1.0.0(240101120000W)", "1-0:1.8.1(000001.500*kWh)", eol="\n")
    assert samples(decode(lf)) == samples(decode(crlf))
    [s] = samples(decode(lf))
    assert s.fields == {"energy_import_t1": 1.5} and s.time_ns == utc("2024-01-01T11:00:00")


def test_telegram_without_line_end_at_the_end_of_a_capture_is_decoded():
    data = fixture("dsmr42_kaifa.txt").rstrip(b"\r\n")
    assert samples(decode(data)) == samples(decode(fixture("dsmr42_kaifa.txt")))
    decoder = DsmrDecoder()
    assert decoder.feed(data) == []  # it may still get its digits and line end
    assert len(samples(decoder.flush())) == 2


def test_incomplete_telegram_at_flush():
    data = fixture("dsmr42_kaifa.txt")[:300]
    assert rejections(decode(b"\r\n" + data)) == [("incomplete", 2, 300)]


def test_too_long_is_rejected_and_the_buffer_stays_bounded():
    good = fixture("dsmr42_kaifa.txt")
    junk = b"/" + b"1-0:1.8.1(000001.000*kWh)\r\n" * 400  # 11 KB without '!'
    decoder = DsmrDecoder()
    events = []
    for i in range(0, len(junk), 100):
        events += decoder.feed(junk[i:i + 100])
        assert decoder.buffered <= decoder.max_buffer == MAX_BUFFER
    events += decoder.feed(good) + decoder.flush()
    assert rejections(events)[0] == ("too_long", 0, MAX_BUFFER - 5)
    assert [r[0] for r in rejections(events)] == ["too_long", "garbage"]
    assert samples(events) == samples(decode(good))


def test_max_buffer_is_checked():
    with pytest.raises(ValueError):
        DsmrDecoder(max_buffer=10)


# -- values inside a valid telegram ------------------------------------------------------------------------------


def test_malformed_values_are_left_out_with_quality_never_a_number():
    decoder = DsmrDecoder()
    [s] = decoder.feed(telegram(
        "1-3:0.2.8(50)",
        "0-0:1.0.0(241340120000W)",  # month 13
        "1-0:1.8.1(abc*kWh)",
        "1-0:1.8.2(000001.000*kW)",  # unit of another quantity
        "1-0:2.8.1(000001.000)",  # no unit
        "1-0:2.8.2(000002.000*kWh)",
        "0-0:96.14.0(0001*kWh)",  # an int with a unit
        "1-0:2.7.0()",
        "1-0:32.7.0(230.0*V",  # unbalanced
        "1-0:52.7.0(230.0*V)(1)",  # two values
        "0-0:96.7.21(-1)",
        "1-0:99.1.0(1)(2)",  # unknown code
        "hello",  # not a data line
    ))
    assert s.fields == {"energy_export_t2": 2.0}
    assert s.time_ns is None
    assert s.quality == {"timestamp": "malformed", "energy_import_t1": "malformed",
                         "energy_import_t2": "malformed", "energy_export_t1": "malformed",
                         "tariff": "malformed", "power_export": "not_available", "voltage_l1": "malformed",
                         "voltage_l2": "malformed", "power_failures": "malformed"}
    assert decoder.unknown == {"1-0:99.1.0": 1} and decoder.stats["malformed_lines"] == 1


def test_unknown_codes_are_bounded():
    decoder = DsmrDecoder()
    lines = [f"1-0:{c}.9.9(1)" for c in range(100)]
    decoder.feed(telegram(*lines[:50]) + telegram(*lines[50:]))
    assert len(decoder.unknown) == 65 and decoder.unknown["other"] == 36  # 64 codes, then "other"
    assert decoder.stats["unknown_lines"] == 100


@pytest.mark.parametrize(("lines", "detail"), [
    ((), "no data lines"),
])
def test_malformed_telegram(lines, detail):
    [r] = decode(telegram(*lines))
    assert r.reason == "malformed" and detail in r.detail


def test_bang_not_at_a_line_start_is_malformed():
    body = b"/XMX5TEST\r\n\r\n1-0:1.8.1(000001.000*kWh)!"
    data = body + f"{crc16_arc(body):04X}\r\n".encode()
    [r] = decode(data)
    assert (r.reason, r.offset, r.length) == ("malformed", 0, len(data))


def test_placeholder_telegram_time_is_not_available():
    [s] = decode(telegram("0-0:1.0.0(000101000000W)", "1-0:1.8.1(000001.000*kWh)"))
    assert s.time_ns is None and s.quality == {"timestamp": "not_available"}


def test_mbus_device_types_readings_and_units():
    events = decode(telegram(
        "0-0:1.0.0(240101120000W)",
        "0-1:24.1.0(007)", "0-1:96.1.0(AB)", "0-1:24.2.1(240101115500W)(000123456*dm3)",
        "0-2:24.1.0(004)", "0-2:24.2.1(240101110000W)(00012.500*MWh)",
        "0-3:24.1.0(099)", "0-3:24.2.1(240101110000W)(00001.000*m3)",
        "0-4:24.1.0(003)", "0-4:24.2.1(240101110000W)(00001.000*m3)", "0-4:24.2.3(240101100000W)(00002.000*m3)",
        "0-5:24.1.0(003)", "0-5:24.2.1(24010111000W)(00001.000*m3)", "0-5:24.4.0(0)",
        "0-6:24.1.0(003)", "0-6:24.2.1(240101110000W)(00001.000*kW)",
        "0-7:24.1.0(021)", "0-7:24.2.1()(00001.000*m3)",
    ))
    by_channel = {s.tags["channel"]: s for s in samples(events) if s.measurement}
    water = by_channel["1"]
    assert water.measurement == "water" and water.fields == {"volume": 123.456} and water.units == {"volume": "m³"}
    assert water.tags == {"channel": "1", "device_type": "7", "equipment_id": "AB"}
    assert water.time_ns == utc("2024-01-01T10:55:00")
    heat = by_channel["2"]
    assert heat.measurement == "heat" and heat.fields == {"energy": 12500.0} and heat.units == {"energy": "kWh"}
    other = by_channel["3"]
    assert other.measurement == "meter" and other.tags == {"channel": "3", "device_type": "99"}
    gas = [s for s in samples(events) if s.tags.get("channel") == "4"]
    assert [(s.time_ns, s.fields) for s in gas] == [(utc("2024-01-01T10:00:00"), {"volume": 1.0}),
                                                   (utc("2024-01-01T09:00:00"), {"volume_uncorrected": 2.0})]
    bad_time = by_channel["5"]
    assert bad_time.time_ns is None and bad_time.fields == {"valve_position": 0}
    assert bad_time.quality == {"capture_time": "malformed"}
    bad_unit = by_channel["6"]
    assert bad_unit.fields == {} and bad_unit.quality == {"value": "malformed"}
    assert bad_unit.time_ns == utc("2024-01-01T10:00:00")
    assert "7" not in by_channel  # no capture time: nothing to report


# -- time ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("161113205757W", "2016-11-13T19:57:57"),  # winter: CET = UTC+1
    ("200426223325S", "2020-04-26T20:33:25"),  # summer: CEST = UTC+2
    ("231029023000S", "2023-10-29T00:30:00"),  # the repeated hour, first time (still summer time) ...
    ("231029023000W", "2023-10-29T01:30:00"),  # ... and second time: the flag tells them apart
    ("240229235959W", "2024-02-29T22:59:59"),
    ("700101010000W", "1970-01-01T00:00:00"),  # the placeholder some meters send
    # without the flag (DSMR 2.2/3.0 capture times): the EU rule
    ("230101120000", "2023-01-01T11:00:00"),
    ("230701120000", "2023-07-01T10:00:00"),
    ("230326013000", "2023-03-26T00:30:00"),  # 26 March 2023, last Sunday: 01:30 CET
    ("230326030000", "2023-03-26T01:00:00"),  # 03:00 CEST, the first summer-time minute
    ("230326023000", "2023-03-26T01:30:00"),  # the skipped hour: read as winter time
    ("231029023000", "2023-10-29T00:30:00"),  # the repeated hour: its first occurrence (summer time)
    ("231029030000", "2023-10-29T02:00:00"),  # 03:00 CET
])
def test_timestamps_to_utc(text: str, expected: str):
    assert timestamp_ns(text) == utc(expected)


@pytest.mark.parametrize("text", ["2311021215", "231302121548W", "230230121548W", "231102251548W", "231102121548X",
                                  "23110212154aW", "231102121548WW"])
def test_bad_timestamps(text: str):
    with pytest.raises(ValueError):
        timestamp_ns(text)


def test_eu_summer_time_boundaries():
    assert not eu_summer_time(datetime(2024, 3, 31, 0, 59, 59, tzinfo=UTC))
    assert eu_summer_time(datetime(2024, 3, 31, 1, tzinfo=UTC))
    assert eu_summer_time(datetime(2024, 10, 27, 0, 59, 59, tzinfo=UTC))
    assert not eu_summer_time(datetime(2024, 10, 27, 1, tzinfo=UTC))


def test_telegram_times_w_and_s():
    winter = telegram("0-0:1.0.0(231102121548W)", "1-0:1.8.1(000001.000*kWh)")
    summer = telegram("0-0:1.0.0(230724150730S)", "1-0:1.8.1(000001.000*kWh)")
    assert samples(decode(winter))[0].time_ns == utc("2023-11-02T11:15:48")
    assert samples(decode(summer))[0].time_ns == utc("2023-07-24T13:07:30")


# -- the map ------------------------------------------------------------------------------------------------------


def test_obis_map_names_are_valid_and_unique():
    names = [e.name for e in obis.ELECTRICITY.values() if e.kind in ("float", "int", "max_demand")]
    names += [e.alternative[1] for e in obis.ELECTRICITY.values() if e.alternative]
    assert len(names) == len(set(names))
    units = {u for u, _ in obis.UNITS.values()}
    for entry in obis.ELECTRICITY.values():
        assert entry.unit == "" or entry.unit in units, entry  # a unit some spelling converts into
        if entry.kind in ("float", "max_demand"):  # the vocabulary's name, unit and type (tests/test_vocabulary.py)
            match = vocabulary.lookup(entry.name)
            assert match is not None and match.unit == entry.unit and match.type == "float", entry
    assert all(n.isascii() and n.isidentifier() and len(n) <= 128 for n in names)


# -- junk ---------------------------------------------------------------------------------------------------------

ALPHABET = list(b"/!\r\n()*:-.0123456789ABCDEFW\x00\xff")
junk = st.one_of(st.binary(max_size=1500), st.lists(st.sampled_from(ALPHABET), max_size=1500).map(bytes))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=junk, cuts=st.lists(st.integers(min_value=0, max_value=1500), max_size=8),
       max_buffer=st.integers(min_value=64, max_value=400))
def test_junk_never_raises_and_the_buffer_stays_bounded(data: bytes, cuts: list[int], max_buffer: int):
    decoder = DsmrDecoder(max_buffer=max_buffer)
    events = []
    previous = 0
    for cut in sorted({min(c, len(data)) for c in cuts} | {len(data)}):
        events += decoder.feed(data[previous:cut])
        previous = cut
        assert decoder.buffered <= max_buffer
    events += decoder.flush()
    assert events == decode(data, max_buffer=max_buffer)  # split-independent
    end = 0
    for r in (e for e in events if isinstance(e, Rejected)):
        assert end <= r.offset and r.offset + r.length <= len(data)
        end = r.offset + r.length


@settings(max_examples=100, deadline=None)
@given(data=junk, name=st.sampled_from(FILES))
def test_a_telegram_after_any_junk_still_decodes(data: bytes, name: str):
    good = fixture(name)
    assert samples(decode(data + good))[-len(samples(decode(good))):] == samples(decode(good))


# -- edge-agent decode --------------------------------------------------------------------------------------------


def test_edge_agent_decode_dsmr():
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "decode", "dsmr",
                             str(GOLDEN / "fluvius_emucs_v171.txt")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["measurement"] for o in out] == ["electricity", "gas", "water"]
    assert out[0]["time"].startswith("2020-05-12T11:54:09") and out[1]["fields"]["volume_uncorrected"] == 112.384
