"""Nova SDS011, Plantower PMS x003, Winsen MH-Z19B: golden captures, splits, garbage, bit flips, junk."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.serial import sensors
from edge_agent.serial.base import Rejected, Sample
from edge_agent.serial.sensors import (
    DECODERS,
    GARBAGE_REPORT,
    MHZ19B_QUERY,
    Mhz19bDecoder,
    PmsX003Decoder,
    Sds011Decoder,
    mhz19b_command,
)

GOLDEN = Path(__file__).parent / "golden" / "serial_sensors"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text(encoding="utf-8"))
FIXTURES = {"sds011": "pypms_SDS01x.hexdump", "pmsx003": "pypms_PMSx003.hexdump", "mhz19b": "pypms_MHZ19B.hexdump"}
FRAME = {"sds011": 10, "pmsx003": 32, "mhz19b": 9}


def read_hexdump(path: Path) -> list[tuple[int, bytes]]:
    """`xxd`-style lines: `OFFSET: hex bytes  ascii` -> (offset, bytes) per line; offsets must be contiguous."""
    rows, expect = [], 0
    for number, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        offset, sep, rest = line.partition(": ")
        assert sep, f"{path.name}:{number}: no 'offset: ' prefix"
        data = bytes.fromhex(rest.split("  ", 1)[0])
        assert int(offset, 16) == expect, f"{path.name}:{number}: offset {offset}, expected {expect:08x}"
        rows.append((expect, data))
        expect += len(data)
    return rows


def stream(name: str) -> bytes:
    return b"".join(data for _, data in read_hexdump(GOLDEN / FIXTURES[name]))


def frames(name: str) -> list[bytes]:
    return [data for _, data in read_hexdump(GOLDEN / FIXTURES[name])]


def run(decoder, *chunks: bytes):
    events = []
    for chunk in chunks:
        events += decoder.feed(chunk)
        assert len(decoder._buf) <= decoder.max_buffer
    return events + decoder.flush()


def samples(events) -> list[Sample]:
    return [e for e in events if isinstance(e, Sample)]


def rejections(events) -> list[Rejected]:
    return [e for e in events if isinstance(e, Rejected)]


def as_expected(sample: Sample) -> dict:
    return {"fields": sample.fields, "tags": sample.tags}


# --- golden captures --------------------------------------------------------------------------------------------

def test_query_and_command_bytes():
    assert bytes.fromhex("ff 01 86 00 00 00 00 00 79") == MHZ19B_QUERY
    assert mhz19b_command(0x79, b"\xa0\x00\x00\x00\x00") == bytes.fromhex("ff 01 79 a0 00 00 00 00 e6")  # ABC on
    with pytest.raises(ValueError):
        mhz19b_command(0x86, b"\x00")


def test_first_frames_by_hand():
    """The first frame of each capture, worked out from the datasheets' layouts (see the golden NOTICE)."""
    (sds,) = samples(Sds011Decoder().feed(bytes.fromhex("aa c0 06 00 06 00 58 d9 3d ab")))
    assert sds.fields == {"pm2_5": 0.6, "pm10": 0.6}  # 0x0006 / 10 µg/m³
    assert sds.tags == {"sensor_id": "58D9"}
    assert sds.measurement is None and sds.time_ns is None  # the source's measurement and clock
    assert sds.units == {"pm2_5": "µg/m³", "pm10": "µg/m³"}

    (pms,) = samples(PmsX003Decoder().feed(frames("pmsx003")[0]))
    assert pms.fields == {"pm1_0_cf1": 0.0, "pm2_5_cf1": 8.0, "pm10_cf1": 8.0, "pm1_0": 0.0, "pm2_5": 8.0, "pm10": 8.0,
                          "particles_0_3": 2100.0, "particles_0_5": 700.0, "particles_1_0": 450.0,
                          "particles_2_5": 300.0, "particles_5_0": 0.0, "particles_10": 0.0, "error_code": 0}
    assert pms.tags == {"version": "97"}
    assert pms.units["particles_0_3"] == "1/L" and pms.units["pm2_5"] == "µg/m³"

    (co2,) = samples(Mhz19bDecoder().feed(bytes.fromhex("ff 86 02 7c 42 00 00 00 ba")))
    assert co2.fields == {"co2": 636.0, "temperature": 26.0}  # 2*256+0x7c ppm; 0x42-40 °C
    assert co2.units == {"co2": "ppm", "temperature": "°C"}


@pytest.mark.parametrize("name", FIXTURES)
def test_golden_capture(name):
    expected = EXPECTED[FIXTURES[name]]
    events = run(DECODERS[name](), stream(name))
    assert rejections(events) == []
    assert [as_expected(s) for s in events] == [{"fields": e["fields"], "tags": e["tags"]} for e in expected["samples"]]
    assert all(s.units == expected["units"] for s in events)
    # fed as captured, line by line: each line is one frame, completed where the capture says it starts
    decoder = DECODERS[name]()
    for (offset, data), want in zip(read_hexdump(GOLDEN / FIXTURES[name]), expected["samples"], strict=True):
        assert want["offset"] == offset
        (got,) = decoder.feed(data)
        assert as_expected(got) == {"fields": want["fields"], "tags": want["tags"]}
    assert decoder.flush() == []


def test_field_types_are_stable_across_models():
    """pm2_5/pm10 are floats from the SDS011 (0.1 steps) and the PMS (1 steps): one InfluxDB field type."""
    sds = samples(run(Sds011Decoder(), stream("sds011")))[0]
    pms = samples(run(PmsX003Decoder(), stream("pmsx003")))[0]
    for field in ("pm2_5", "pm10"):
        assert type(sds.fields[field]) is type(pms.fields[field]) is float


# --- splits and garbage -----------------------------------------------------------------------------------------

def noisy(name: str) -> bytes:
    """The capture with noise between frames: sync bytes, a half frame, a truncated frame, zeros."""
    parts = frames(name)
    sync = bytes([DECODERS[name].SYNC])
    noise = [b"\x00\x13" + sync, parts[0][: FRAME[name] // 2], sync * 3, b"\x00" * 40, parts[1][:-1], b"\xaa\x42\xff"]
    out = b""
    for i, frame in enumerate(parts):
        out += noise[i % len(noise)] + frame
    return out + sync


@pytest.mark.parametrize("name", FIXTURES)
def test_every_split_gives_the_same_events(name):
    for data in (stream(name), noisy(name)):
        whole = run(DECODERS[name](), data)
        for cut in range(1, len(data)):
            assert run(DECODERS[name](), data[:cut], data[cut:]) == whole, cut
        assert run(DECODERS[name](), *(data[i:i + 1] for i in range(len(data)))) == whole


@pytest.mark.parametrize("name", FIXTURES)
def test_garbage_between_frames_costs_no_frame(name):
    clean = samples(run(DECODERS[name](), stream(name)))
    events = run(DECODERS[name](), noisy(name))
    assert samples(events) == clean
    bad = rejections(events)
    assert bad and {r.reason for r in bad} <= {"garbage", "checksum", "malformed", "incomplete"}
    assert bad[-1].reason == "incomplete" and bad[-1].length == 1  # the sync byte the stream ended on
    offsets = [r.offset for r in bad]
    assert offsets == sorted(offsets)


def test_garbage_offsets_and_lengths():
    frame = frames("sds011")[0]
    events = run(Sds011Decoder(), b"\x01\x02\x03" + frame + b"\xaa\x00" + frame)
    assert [(type(e).__name__, getattr(e, "reason", ""), getattr(e, "offset", 0), getattr(e, "length", 0))
            for e in events] == [("Rejected", "garbage", 0, 3), ("Sample", "", 0, 0),
                                 ("Rejected", "garbage", 13, 2), ("Sample", "", 0, 0)]
    assert events[0].detail == "no frame start: 01 02 03"


def test_a_false_start_in_noise_does_not_swallow_the_frame_after_it():
    """`AA C0` in noise 4 bytes before a real frame: that 'frame' fails, the real one inside it is found."""
    frame = frames("sds011")[0]
    events = run(Sds011Decoder(), b"\xaa\xc0\x01\x02" + frame)
    assert [r.reason for r in rejections(events)] == ["malformed"]  # its 10th byte (frame[5]) is not AB
    assert rejections(events)[0].offset == 0 and rejections(events)[0].length == 10
    assert samples(events) == samples(Sds011Decoder().feed(frame))


def test_long_junk_is_reported_in_bounded_pieces():
    decoder = Sds011Decoder()
    events = decoder.feed(b"\x00" * 1000)
    assert [(r.offset, r.length) for r in events] == [(i * GARBAGE_REPORT, GARBAGE_REPORT) for i in range(3)]
    assert decoder.flush() == [Rejected(768, "garbage", "no frame start: 00 00 00 00 00 00 00 00 ...", 232)]
    assert len(decoder._buf) == 0


def test_unsupported_frames_are_named_not_decoded():
    # SDS011 answer to a configuration command ("query reporting mode"), checksum over bytes 2..7
    body = bytes([0x02, 0x00, 0x01, 0x00, 0xA1, 0x60])
    reply = b"\xaa\xc5" + body + bytes([sum(body) & 0xFF]) + b"\xab"
    (event,) = run(Sds011Decoder(), reply)
    assert event.reason == "unsupported" and event.length == 10

    # a 24-byte Plantower frame (length word 0x14, as PMS1003/3003 send) with a good checksum
    head = b"\x42\x4d\x00\x14" + bytes(range(1, 19))
    short = head + (sum(head) & 0xFFFF).to_bytes(2, "big")
    (event,) = run(PmsX003Decoder(), short)
    assert (event.reason, event.length) == ("unsupported", 24)
    assert "24-byte frame" in event.detail


def test_pms_length_word_is_bounded():
    """A corrupt length word is rejected at once: the framer does not wait for a 64 KiB frame."""
    decoder = PmsX003Decoder()
    good = frames("pmsx003")[0]
    events = decoder.feed(b"\x42\x4d\xff\xf0" + good)
    assert [(r.reason, r.offset, r.length) for r in rejections(events)] == [("malformed", 0, 4)]
    assert len(samples(events)) == 1


def test_mhz19b_query_echo_is_not_an_answer():
    """Adapters that echo what they send put our own query in front of the answer."""
    answer = frames("mhz19b")[0]
    events = run(Mhz19bDecoder(), MHZ19B_QUERY + answer)
    assert [(r.reason, r.offset, r.length) for r in rejections(events)] == [("garbage", 0, 9)]
    assert samples(events)[0].fields["co2"] == 636.0


def test_flush_reports_a_truncated_frame_and_the_decoder_goes_on():
    decoder = PmsX003Decoder()
    frame = frames("pmsx003")[0]
    assert decoder.feed(frame[:20]) == []
    assert decoder.flush() == [Rejected(0, "incomplete", "stream ended inside a frame: 42 4d 00 1c 00 00 00 08", 20)]
    assert decoder.flush() == []
    (sample,) = decoder.feed(frame)  # offsets continue after the flushed bytes
    assert sample.fields["pm2_5"] == 8.0
    assert decoder.feed(b"\x00") == [] and decoder.flush()[0].offset == 52


# --- single bit flips -------------------------------------------------------------------------------------------

def flipped_reason(name: str, index: int) -> set[str]:
    """What a flip in byte `index` must be reported as. The checksum covers the data and length bytes; it cannot
    cover the sync bytes (a flipped sync byte means no frame starts there: the bytes are garbage) nor the
    SDS011's tail (checked on its own: "malformed"). A flipped PMS length word changes which bytes are summed,
    or is out of range."""
    if name == "sds011":
        return {0: {"garbage"}, 1: {"garbage"}, 9: {"malformed"}}.get(index, {"checksum"})
    if name == "pmsx003":
        return {0: {"garbage"}, 1: {"garbage"}, 2: {"malformed"}, 3: {"checksum", "malformed"}}.get(index, {"checksum"})
    return {0: {"garbage"}, 1: {"garbage"}}.get(index, {"checksum"})


@pytest.mark.parametrize("name", FIXTURES)
def test_every_single_bit_flip_is_rejected_and_costs_only_its_frame(name):
    parts = frames(name)
    size = FRAME[name]
    for k in range(1, len(parts) - 1):
        before, frame, after = parts[k - 1], parts[k], parts[k + 1]
        want = samples(run(DECODERS[name](), before + after))
        for index in range(size):
            for bit in range(8):
                bad = bytearray(frame)
                bad[index] ^= 1 << bit
                events = run(DECODERS[name](), before + bytes(bad) + after)
                assert samples(events) == want, (k, index, bit)  # never a wrong value, never a lost neighbour
                first = rejections(events)[0]
                assert first.offset == len(before), (k, index, bit)
                assert first.reason in flipped_reason(name, index), (k, index, bit, first)
                assert all(r.offset < len(before) + size for r in rejections(events))


# --- junk ---------------------------------------------------------------------------------------------------------

def chunks_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.parametrize("name", FIXTURES)
@settings(max_examples=150, deadline=None)
@given(junk=st.binary(max_size=600), cuts=st.lists(st.integers(min_value=0, max_value=700), max_size=12))
def test_junk_is_bounded_and_never_raises(name, junk, cuts):
    total = len(junk)
    events = run(DECODERS[name](), *chunks_of(junk, cuts))
    assert events == run(DECODERS[name](), junk)  # split-independent
    for event in rejections(events):
        assert event.offset >= 0 and event.offset + event.length <= total and event.length > 0
    offsets = [r.offset for r in rejections(events)]
    assert offsets == sorted(offsets)


@pytest.mark.parametrize("name", FIXTURES)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_frames_survive_any_sync_free_noise(name, data):
    sync = DECODERS[name].SYNC
    parts = frames(name)
    noise = st.binary(max_size=40).map(lambda b: bytes(x for x in b if x != sync))
    blob = b"".join(data.draw(noise) + frame for frame in parts) + data.draw(noise)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(blob)), max_size=10))
    events = run(DECODERS[name](), *chunks_of(blob, cuts))
    assert [as_expected(s) for s in samples(events)] == [
        {"fields": e["fields"], "tags": e["tags"]} for e in EXPECTED[FIXTURES[name]]["samples"]]
    assert {r.reason for r in rejections(events)} <= {"garbage"}
    assert sum(r.length for r in rejections(events)) == len(blob) - sum(map(len, parts))


def test_decoders_table():
    assert set(DECODERS) == {"sds011", "pmsx003", "mhz19b"}
    for make in DECODERS.values():
        decoder = make()
        assert decoder.max_buffer >= 9 and decoder.feed(b"") == [] and decoder.flush() == []
    assert sensors.MHZ19B_FRAME == 9
