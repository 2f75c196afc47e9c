"""NMEA 0183 decoding: framing, checksums, GGA/RMC to samples, golden sentences from pynmea2, torture and junk."""

from __future__ import annotations

import itertools
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.serial.base import Rejected, Sample
from edge_agent.serial.nmea import KNOT_M_S, NmeaDecoder, checksum

GOLDEN = Path(__file__).parent / "golden" / "nmea"
WRITE = os.environ.get("CITYNERVE_WRITE_GOLDEN") == "1"


def sentences() -> list[bytes]:
    lines = (GOLDEN / "pynmea2_valid_sentences.txt").read_bytes().splitlines()
    return [line for line in lines if line.startswith(b"$")]


def as_json(event) -> dict:
    if isinstance(event, Rejected):
        return {"rejected": event.reason, "offset": event.offset, "length": event.length}
    return {"fields": event.fields, "time_ns": event.time_ns, "tags": event.tags, "quality": event.quality,
            "units": event.units, "measurement": event.measurement}


def decode(data: bytes, **kwargs) -> list:
    decoder = NmeaDecoder(**kwargs)
    return decoder.feed(data) + decoder.flush()


def sentence(body: str) -> bytes:
    return f"${body}*{checksum(body.encode()):02X}\r\n".encode()


def ns(text: str) -> int:
    dt = datetime.fromisoformat(text).replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def check_golden(name: str, got) -> None:
    path = GOLDEN / name
    if WRITE:
        path.write_text("[\n" + ",\n".join(json.dumps(item) for item in got) + "\n]\n")
    assert got == json.loads(path.read_text())


# -- golden -------------------------------------------------------------------------------------------------------


def test_the_fixture_sentences_are_what_the_notice_says():
    assert len(sentences()) == 128


def test_golden_valid_sentences_one_by_one():
    got = [{"sentence": s.decode(), "events": [as_json(e) for e in decode(s + b"\r\n")]} for s in sentences()]
    check_golden("expected_valid.json", got)


def test_golden_examples_log():
    check_golden("expected_examples.json", [as_json(e) for e in decode((GOLDEN / "pynmea2_examples_data.log").read_bytes())])


def test_valid_sentences_as_one_stream_no_checksum_rejections_only_gga_rmc_samples():
    decoder = NmeaDecoder()
    events = decoder.feed(b"\r\n".join(sentences()) + b"\r\n") + decoder.flush()
    rejected = [e for e in events if isinstance(e, Rejected)]
    samples = [e for e in events if isinstance(e, Sample)]
    gga_rmc = [s for s in sentences() if s[3:6] in (b"GGA", b"RMC")]
    # the one GGA with decimal degrees instead of ddmm.mmm ("37.352387") is malformed, nothing else is rejected
    assert [(r.reason, r.length) for r in rejected] == [("malformed", 87)]
    assert len(samples) == len(gga_rmc) - 1
    assert sum(decoder.ignored.values()) == len(sentences()) - len(gga_rmc)
    assert decoder.ignored["GSV"] == 3 and decoder.ignored["PTNL"] == 9 and decoder.ignored["R00"] == 2
    assert all(s.measurement == "gps" and s.tags == {"talker": "GP"} for s in samples)


def test_examples_log_negative_cases():
    decoder = NmeaDecoder()
    data = (GOLDEN / "pynmea2_examples_data.log").read_bytes()
    events = decoder.feed(data)
    assert [type(e).__name__ for e in events] == ["Sample", "Rejected"]
    garbage = events[1]
    assert (garbage.reason, data[garbage.offset:garbage.offset + garbage.length]) == ("garbage", b"foobar\r\n")
    assert decoder.ignored == {"RTE": 1, "R00": 1}
    assert decoder.flush() == []  # the last sentence has its checksum but no line end: decoded (and ignored)
    assert decoder.ignored["MWV"] == 1


# -- values, checked by hand --------------------------------------------------------------------------------------


def test_gga_values():
    [s] = decode(b"$GPGGA,184353.07,1929.045,S,02410.506,E,1,04,2.6,100.00,M,-33.9,M,,0000*6D\r\n")
    assert s.fields == {"fix_quality": 1, "satellites": 4, "hdop": 2.6, "latitude": pytest.approx(-(19 + 29.045 / 60)),
                        "longitude": pytest.approx(24 + 10.506 / 60), "altitude": 100.0, "geoid_separation": -33.9,
                        "dgps_station": "0000"}
    assert s.time_ns is None  # a time of day without a date (no RMC yet): the gateway stamps it
    assert s.units["altitude"] == "m" and s.units["latitude"] == "°" and s.quality == {}


def test_rmc_values_and_time():
    [s] = decode(b"$GPRMC,225446,A,4916.45,N,12311.12,W,000.5,054.7,191194,020.3,E*68\r\n")
    assert s.fields == {"fix_status": "A", "latitude": pytest.approx(49 + 16.45 / 60),
                        "longitude": pytest.approx(-(123 + 11.12 / 60)), "speed": pytest.approx(0.5 * 1852 / 3600),
                        "course": 54.7, "magnetic_variation": 20.3}
    assert s.time_ns == ns("1994-11-19T22:54:46")
    assert s.units["speed"] == "m/s"


def test_rmc_fraction_of_a_second_and_west_variation():
    [s] = decode(sentence("GNRMC,010203.125,A,0000.000,N,00000.000,E,1.0,359.9,290224,1.5,W,D"))
    assert s.time_ns == ns("2024-02-29T01:02:03.125000")
    assert s.fields["latitude"] == 0.0 and s.fields["longitude"] == 0.0  # a real fix on the equator is kept
    assert s.fields["magnetic_variation"] == -1.5 and s.fields["fix_mode"] == "D"
    assert s.fields["speed"] == KNOT_M_S and s.tags == {"talker": "GN"}


def test_gga_is_dated_by_the_last_rmc_across_midnight():
    rmc = sentence("GPRMC,235959.50,A,4807.038,N,01131.000,E,0.0,0.0,311223,,")
    gga_next_day = sentence("GPGGA,000000.50,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")
    gga_same = sentence("GPGGA,235959.50,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")
    gga_far = sentence("GPGGA,120000.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")
    events = decode(rmc + gga_same + gga_next_day + gga_far)
    assert [e.time_ns for e in events] == [ns("2023-12-31T23:59:59.500000"), ns("2023-12-31T23:59:59.500000"),
                                           ns("2024-01-01T00:00:00.500000"), None]


def test_no_fix_leaves_the_position_out_never_zero():
    events = decode(b"$GPGGA,201716.684,,,,,0,00,,,M,0.0,M,,0000*5F\r\n"
                    b"$GPGGA,181032.576,3926.276,N,07739.361,W,0,00,,,M,,M,,*5F\r\n"  # a stale position, quality 0
                    b"$GPRMC,181031.576,V,3926.276,N,07739.361,W,99.7,18.30,250915,,E*79\r\n")
    assert len(events) == 3
    for s in events:
        assert "latitude" not in s.fields and "longitude" not in s.fields
        assert s.quality["latitude"] == s.quality["longitude"] == "no_fix"
        assert s.time_ns is None  # the receiver's clock is not trusted without a fix
    assert events[0].fields == {"fix_quality": 0, "satellites": 0}
    assert events[2].fields == {"fix_status": "V"}


def test_rmc_mode_n_overrides_status_a():
    [s] = decode(b"$GPRMC,123519.00,A,4807.038,N,01131.000,E,,,230394,,,N*51\r\n")
    assert s.fields == {"fix_status": "A", "fix_mode": "N"} and s.quality["latitude"] == "no_fix"


def test_fix_with_empty_fields_says_not_available():
    [s] = decode(b"$GPRMC,123519.00,A,4807.038,N,01131.000,E,,,230394,,*33\r\n")
    assert s.quality == {"speed": "not_available", "course": "not_available"}
    assert s.time_ns == ns("1994-03-23T12:35:19")


# -- rejections ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "reason"), [
    (b"$IIMWV,271.0,R,000.2,N,A*3B4\r\n", "checksum"),  # three digits
    (b"$IIMWV,271.0,R,000.2,N,A*3C\r\n", "checksum"),  # wrong
    (b"$IIMWV,271.0,R,000.2,N,A*\r\n", "checksum"),
    (b"$IIMWV,271.0,R,000.2,N,A*3B \r\n", "checksum"),
    (b"$GPGGA,184353.07,1929.045,S,02410.506,E,1,04,2.6,100.00,M,-33.9,M,,0000\r\n", "no_checksum"),
    (b"$IIMWV,271.0,R,000.2,N,A\r\n", "no_checksum"),
    (b"$\r\n", "malformed"),
    (sentence("GPGGA,184353.07,1929.045,X,02410.506,E,1,04,2.6,100.00,M,-33.9,M,,"), "malformed"),  # hemisphere
    (sentence("GPGGA,184353.07,1969.045,N,02410.506,E,1,04,2.6,100.00,M,-33.9,M,,"), "malformed"),  # 69 minutes
    (sentence("GPGGA,184353.07,9100.000,N,02410.506,E,1,04,2.6,100.00,M,-33.9,M,,"), "malformed"),  # 91 degrees
    (sentence("GPGGA,184353.07,1929.045,N,2410.506,E,1,04,2.6,100.00,M,-33.9,M,,"), "malformed"),  # ddmm for lon
    (sentence("GPGGA,184353.07,1929.045,N,02410.506,E,1,04,2.6,abc,M,-33.9,M,,"), "malformed"),
    (sentence("GPGGA,184353.07,1929.045,N,02410.506,E,1,04,2.6,100,F,-33.9,M,,"), "malformed"),  # feet
    (sentence("GPGGA,184353.07,1929.045,N,02410.506,E,,04"), "malformed"),  # no fix quality
    (sentence("GPGGA,184353"), "malformed"),
    (sentence("GPRMC,256000,A,4807.038,N,01131.000,E,,,230394,,"), "malformed"),  # 25 h
    (sentence("GPRMC,123519,A,4807.038,N,01131.000,E,,,300294,,"), "malformed"),  # 30 February
    (sentence("GPRMC,123519,X,4807.038,N,01131.000,E,,,230394,,"), "malformed"),  # status
    (sentence("gpgga,1"), "malformed"),  # address
    (b"$GPGGA,\x01*" + f"{checksum(b'GPGGA,' + bytes([1])):02X}".encode() + b"\r\n", "malformed"),
])
def test_rejected(line, reason):
    [event] = decode(line)
    assert isinstance(event, Rejected) and (event.reason, event.offset) == (reason, 0), event


def test_lower_case_checksum_accepted():
    [s] = decode(b"$GPGGA,184353.07,1929.045,S,02410.506,E,1,04,2.6,100.00,M,-33.9,M,,0000*6d\r\n")
    assert isinstance(s, Sample)


def test_a_listed_type_may_come_without_checksum():
    line = b"$GPGGA,184353.07,1929.045,S,02410.506,E,1,04,2.6,100.00,M,-33.9,M,,0000\r\n"
    [s] = decode(line, accept_without_checksum={"GGA"})
    assert isinstance(s, Sample) and s.fields["satellites"] == 4


@pytest.mark.parametrize("end", [b"\r\n", b"\n", b"\r", b"\n\r", b"\r\n\r\n"])
def test_line_ends(end):
    gga = b"$GPGGA,184353.07,1929.045,S,02410.506,E,1,04,2.6,100.00,M,-33.9,M,,0000*6D"
    events = decode(gga + end + gga + end)
    assert [type(e) for e in events] == [Sample, Sample]


def test_long_sentences_are_accepted_up_to_the_limit_then_resynchronised():
    pubx = next(s for s in sentences() if s.startswith(b"$PUBX,03"))
    assert len(pubx) > 82 * 3  # longer than the standard's 82 characters
    decoder = NmeaDecoder()
    assert decoder.feed(pubx + b"\r\n") == [] and decoder.ignored["PUBX"] == 1
    gga = b"$GPGGA,184353.07,1929.045,S,02410.506,E,1,04,2.6,100.00,M,-33.9,M,,0000*6D\r\n"
    long = b"$GPTXT," + b"A" * 2000 + b"*00\r\n"
    events = decoder.feed(long + gga)
    assert [(type(e).__name__, getattr(e, "reason", "")) for e in events] == [
        ("Rejected", "too_long"), ("Rejected", "garbage"), ("Sample", "")]
    too_long, garbage = events[0], events[1]
    assert too_long.offset == len(pubx) + 2 and too_long.length == 1024
    assert garbage.offset == too_long.offset + 1024 and garbage.length == len(long) - 1024
    assert len(decoder._buf) <= decoder.max_buffer


def test_exactly_max_sentence_is_accepted_one_more_is_too_long():
    line = sentence("GPTXT,01,01,02," + "x" * (1024 - 19))
    assert len(line.rstrip(b"\r\n")) == 1024
    decoder = NmeaDecoder()
    assert decoder.feed(line) == [] and decoder.ignored["TXT"] == 1
    line = sentence("GPTXT,01,01,02," + "x" * (1024 - 18))
    events = decoder.feed(line) + decoder.flush()
    assert [(e.reason, e.length) for e in events] == [("too_long", 1024), ("garbage", 3)]


def test_truncated_sentence_then_the_next_one():
    gga = b"$GPGGA,184353.07,1929.045,S,02410.506,E,1,04,2.6,100.00,M,-33.9,M,,0000*6D\r\n"
    events = decode(b"$GPGGA,1843" + gga)
    assert isinstance(events[0], Rejected) and (events[0].reason, events[0].offset, events[0].length) == ("truncated", 0, 11)
    assert isinstance(events[1], Sample)


def test_garbage_between_sentences_is_reported_exactly():
    gga = b"$GPGGA,184353.07,1929.045,S,02410.506,E,1,04,2.6,100.00,M,-33.9,M,,0000*6D\r\n"
    junk = b"\x00\xff\xfe garbage\x7f"
    data = gga + junk + gga + b"\r\n\r\n" + gga
    events = decode(data)
    assert [type(e) for e in events] == [Sample, Rejected, Sample, Sample]
    assert (events[1].reason, events[1].offset, events[1].length) == ("garbage", len(gga), len(junk))


def test_flush_reports_an_incomplete_sentence():
    events = decode(b"$GPGGA,184353.07,1929.0")
    assert [(e.reason, e.offset, e.length) for e in events] == [("incomplete", 0, 23)]


def test_ignored_kinds_are_bounded():
    decoder = NmeaDecoder()
    for i in range(200):
        decoder.feed(sentence(f"PX{i:03d},1"))
    assert len(decoder.ignored) <= 65 and decoder.ignored["other"] == 200 - 64


# -- torture ------------------------------------------------------------------------------------------------------


def torture_stream() -> bytes:
    data = b"\r\n".join(sentences()) + b"\r\n"
    return (b"\xff\x00noise" + data + (GOLDEN / "pynmea2_examples_data.log").read_bytes() + b"\r\n"
            + b"$GPGGA,1843" + b"\n".join(sentences()[:20]) + b"\n" + b"$GPTXT," + b"B" * 1500 + b"\r\n$GPGGA")


def test_split_at_every_byte_gives_the_same_events():
    data = torture_stream()
    whole = NmeaDecoder()
    expected = whole.feed(data) + whole.flush()
    split = NmeaDecoder()
    got = []
    for i in range(len(data)):
        got += split.feed(data[i:i + 1])
        assert len(split._buf) <= split.max_buffer
    got += split.flush()
    assert got == expected
    assert split.ignored == whole.ignored
    assert {e.reason for e in expected if isinstance(e, Rejected)} == {
        "garbage", "malformed", "truncated", "too_long", "incomplete"}


@settings(max_examples=150, deadline=None)
@given(junk=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=12),
       sprinkle=st.lists(st.sampled_from([b"$", b"!", b"*", b"\r", b"\n", b"$GPGGA,", b"*6D"]), max_size=30))
def test_junk_never_raises_keeps_the_buffer_bounded_and_resynchronises(junk, cuts, sprinkle):
    for i, piece in enumerate(sprinkle):
        at = (i * 97) % (len(junk) + 1)
        junk = junk[:at] + piece + junk[at:]
    gga = b"$GPGGA,184353.07,1929.045,S,02410.506,E,1,04,2.6,100.00,M,-33.9,M,,0000*6D\r\n"
    data = junk + b"\r\n" + gga
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    decoder = NmeaDecoder(max_sentence=256)
    events = []
    for a, b in itertools.pairwise(bounds):
        events += decoder.feed(data[a:b])
        assert len(decoder._buf) <= decoder.max_buffer
    events += decoder.flush()
    whole = NmeaDecoder(max_sentence=256)
    assert events == whole.feed(data) + whole.flush()
    assert isinstance(events[-1], Sample) and events[-1].fields["satellites"] == 4
    offsets = [e.offset for e in events if isinstance(e, Rejected)]
    assert offsets == sorted(offsets) and all(0 <= o < len(data) for o in offsets)
    for e in events:
        if isinstance(e, Rejected):
            assert e.length > 0 and e.offset + e.length <= len(data)
