"""IEC 62056-21 mode C: BCC vectors, identification, readout decoding, the capture decoder, and the sign-on
dialogue state machine against a simulated meter (pure: bytes in, bytes out, no port, no clock)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.serial.base import Rejected, Sample
from edge_agent.serial.iec62056_21 import (
    ACK,
    ETX,
    STX,
    Done,
    Expect,
    Failed,
    Iec62056ReadoutDecoder,
    Iec62056Session,
    ReadoutError,
    Send,
    SetBaud,
    bcc,
    field_name,
    option_select,
    parse_identification,
    parse_readout,
    request,
    run_dialogue,
    run_session,
)

GOLDEN = Path(__file__).parent / "golden" / "iec62056_21"
WRITE = os.environ.get("CITYNERVE_WRITE_GOLDEN") == "1"


def block(lines: bytes, *, good: bool = True) -> bytes:
    body = lines + b"!\r\n" + bytes([ETX])
    check = bcc(body)
    return bytes([STX]) + body + bytes([check if good else check ^ 0x55])


READOUT = (b"0.0.0(71234567)\r\n0.9.1(134512)\r\n0.9.2(230105)\r\n"
           b"1.8.0(0012345.678*kWh)\r\n1.8.1(0010000.000*kWh)\r\n1.8.2(0002345.678*kWh)\r\n2.8.0(0000001.234*kWh)\r\n"
           b"32.7.0(231.4*V)\r\n52.7.0(229.8*V)\r\n72.7.0(230.9*V)\r\n31.7.0(1.25*A)\r\n51.7.0(0.50*A)\r\n71.7.0(3.75*A)\r\n"
           b"F.F(0000000)\r\n")
READOUT_FIELDS = {
    "address": "71234567", "meter_time": "134512", "meter_date": "230105",
    "energy_import": 12345.678, "energy_import_t1": 10000.0, "energy_import_t2": 2345.678,
    "energy_export": 1.234, "voltage_l1": 231.4, "voltage_l2": 229.8, "voltage_l3": 230.9,
    "current_l1": 1.25, "current_l2": 0.5, "current_l3": 3.75, "error_register": "0000000"}


# -- BCC, identification, readout --------------------------------------------------------------------------------


def bcc_vectors() -> list[tuple[bytes, str]]:
    rows = []
    for line in (GOLDEN / "bcc_vectors.psv").read_text().splitlines():
        if line and not line.startswith("#"):
            frame_hex, verified, description, _origin = line.split("|")
            assert verified == "True"
            rows.append((bytes.fromhex(frame_hex), description))
    return rows


def test_there_are_three_bcc_vectors():
    assert len(bcc_vectors()) == 3


@pytest.mark.parametrize(("frame", "description"), bcc_vectors(), ids=lambda v: v[:20] if isinstance(v, str) else None)
def test_bcc_vectors(frame, description):
    assert bcc(frame[1:-1]) == frame[-1], description
    decoder = Iec62056ReadoutDecoder()  # a programming command with a good BCC is skipped silently
    assert decoder.feed(frame) + decoder.flush() == [] and decoder.stats["commands"] == 1
    bad = frame[:-1] + bytes([frame[-1] ^ 1])
    [event] = Iec62056ReadoutDecoder().feed(bad)
    assert (event.reason, event.offset, event.length) == ("bcc", 0, len(frame))


def test_bcc_is_seven_bits_and_the_option_select_of_the_fixture():
    assert bcc(b"\xff") == 0x7F and bcc(b"") == 0
    assert option_select(9600) == bytes.fromhex("06 30 35 30 0D 0A")  # the fixture's 9600 baud option select
    assert request() == b"/?!\r\n" and request("12345678") == b"/?12345678!\r\n"
    with pytest.raises(ValueError):
        request("12/4")


@pytest.mark.parametrize(("char", "baud"), [("0", 300), ("1", 600), ("2", 1200), ("3", 2400), ("4", 4800), ("5", 9600), ("6", 19200)])
def test_identification_mode_c_baud_characters(char, baud):
    ident = parse_identification(f"/LGZ{char}ZMD120AR\r\n".encode())
    assert (ident.manufacturer, ident.mode, ident.baud, ident.identification) == ("LGZ", "C", baud, "ZMD120AR")


@pytest.mark.parametrize(("line", "mode", "baud"), [
    (b"/ABC@meter\r\n", "A", 300),
    (b"/ABCEmeter\r\n", "B", 9600),
    (b"/ABCAmeter\r\n", "B", 600),
    (b"/ABCGmeter\r\n", "B", None),  # reserved
])
def test_identification_modes_a_and_b(line, mode, baud):
    ident = parse_identification(line)
    assert (ident.mode, ident.baud) == (mode, baud)


def test_identification_details():
    ident = parse_identification(b"/ISk5\\2MT382-1000\r\n")
    assert (ident.manufacturer, ident.baud_char, ident.enhanced, ident.identification) == ("ISk", "5", "2", "MT382-1000")
    assert ident.fast_reaction and not parse_identification("/LGZ5ZMD").fast_reaction
    assert parse_identification(b"/EMH4\\@\\2eHZ\r\n").enhanced == "@2"


@pytest.mark.parametrize("line", [b"/?!\r\n", b"/LG5ZMD\r\n", b"LGZ5ZMD\r\n", b"/LGZ\r\n", b"/L1Z5ZMD\r\n",
                                  b"/LGZ5ZM/D\r\n", b"/LGZ5ZM!D\r\n", b"/LGZ5ZM\x01D\r\n"])
def test_identification_malformed(line):
    with pytest.raises(ReadoutError) as info:
        parse_identification(line)
    assert info.value.reason == "malformed"


def test_parse_readout_fields_units_and_the_meters_time():
    sample = parse_readout(block(READOUT), parse_identification(b"/ISk5MT174-0001\r\n"))
    assert sample.fields == READOUT_FIELDS
    assert sample.units["energy_import"] == "kWh" and sample.units["voltage_l1"] == "V"
    assert "meter_time" not in sample.units
    assert sample.time_ns is None and sample.measurement is None  # the gateway's time, the source's measurement
    assert sample.tags == {"manufacturer": "ISk", "identification": "MT174-0001"}


def test_parse_readout_codes_units_and_values():
    lines = (b"1-0:1.8.0*255(0001234567*Wh)\r\n"  # long form, current value, converted from Wh
             b"1-0:2.8.0(12.5*MWh)\r\n"
             b"1.8.0*03(1000.5*kWh)\r\n"  # a billing period: the generic name
             b"1.7.0(0.500*kVA)\r\n"  # a unit that does not fit the well-known name
             b"2.7.0(1500*W)\r\n"
             b"1.6.0(1.234*kW)(2301051015)\r\n"  # a maximum and its time
             b"C.1.0(00112233)0-0:96.1.0(99)\r\n"  # two data sets on a line; the same field: the first wins
             b"0-1:24.2.1(12.345*m3)\r\n"  # another medium keeps its A-B
             b"C.90.1(TEXT VALUE)\r\n"
             b"99.1.0()\r\n"  # empty
             b"1.8.1(n/a*kWh)\r\n")
    sample = parse_readout(block(lines))
    assert sample.fields == {
        "energy_import": 1234.567, "energy_export": 12500.0, "obis_1_8_0_f3": 1000.5, "obis_1_7_0": 0.5,
        "power_export": 1500.0, "obis_1_6_0": 1.234, "obis_1_6_0__2": "2301051015", "serial_number": "00112233",
        "obis_0_1_24_2_1": 12.345, "obis_96_90_1__text": "TEXT VALUE", "obis_1_8_1__text": "n/a"}
    assert sample.units == {"energy_import": "kWh", "energy_export": "kWh", "obis_1_8_0_f3": "kWh",
                            "obis_1_7_0": "kVA", "power_export": "W", "obis_1_6_0": "kW",
                            "obis_0_1_24_2_1": "m3", "obis_1_8_1__text": "kWh"}
    assert sample.quality == {"obis_99_1_0": "not_available"}


def test_field_names():
    assert field_name("1.8.0", "kWh") == "energy_import" == field_name("1-0:1.8.0*255", "Wh")
    assert field_name("1.8.0", "kVA") == "obis_1_8_0"
    assert field_name("C.1.0") == field_name("0-0:96.1.0") == "serial_number"
    assert field_name("F.F") == "error_register"
    assert field_name("2-0:1.8.0", "kWh") == "obis_2_0_1_8_0"
    assert field_name("nonsense!") is None and field_name("") is None


def test_parse_readout_rejects_bad_blocks():
    good = block(READOUT)
    with pytest.raises(ReadoutError) as info:
        parse_readout(block(READOUT, good=False))
    assert info.value.reason == "bcc"
    for bad in (good[1:], good[:-2] + good[-1:], b"\x02\x03"):
        with pytest.raises(ReadoutError) as info:
            parse_readout(bad)
        assert info.value.reason == "malformed"


# -- the end character right after the last data set ---------------------------------------------------------------


def test_the_end_character_may_follow_the_last_data_set():
    """§6.3: `STX data block ! CR LF ETX BCC`; some meters put the "!" right after the last data set instead of on
    a line of its own. Before, that line was rejected as "malformed" and its data sets were lost."""
    own_line = block(READOUT)  # ...F.F(0000000) CR LF ! CR LF ETX BCC
    on_data_line = block(READOUT[:-2])  # ...F.F(0000000)! CR LF ETX BCC
    assert on_data_line.endswith(b"F.F(0000000)!\r\n\x03" + on_data_line[-1:])
    assert parse_readout(on_data_line).fields == parse_readout(own_line).fields == READOUT_FIELDS
    decoder = Iec62056ReadoutDecoder()
    [sample] = decoder.feed(on_data_line) + decoder.flush()
    assert sample.fields == READOUT_FIELDS
    # several data sets on that line, and no CR LF between "!" and ETX
    body = b"1.8.0(1.5*kWh)\r\n2.8.0(2.5*kWh)32.7.0(230.1*V)!" + bytes([ETX])
    sample = parse_readout(bytes([STX]) + body + bytes([bcc(body)]))
    assert sample.fields == {"energy_import": 1.5, "energy_export": 2.5, "voltage_l1": 230.1}


@pytest.mark.parametrize(("line", "kept"), [
    (b"1.8.0(1.5*kWh)!2.8.0(2.5*kWh)", {"energy_import": 1.5}),  # "!2.8.0" is no address; the set before is
    (b"1.8.0(1.5*kWh)!!", {}),
    (b"not data!", {}),
])
def test_an_end_character_elsewhere_is_still_malformed(line, kept):
    events = Iec62056ReadoutDecoder().feed(block(line + b"\r\n"))
    assert [getattr(e, "reason", "sample") for e in events] == ["malformed", "sample"]
    assert events[1].fields == kept


def sie_2wr5() -> tuple[bytes, bytes]:
    """(identification line, readout block) of a Siemens 2WR5 heat meter as smartmeter-obis's tests send them
    (tests/golden/iec62056_21/NOTICE): the last data line ends in "...0.0(00010213)!"."""
    data = (GOLDEN / "smartmeter_obis_sie_2wr5.bin").read_bytes()
    end = data.index(b"\n") + 1
    return data[:end], data[end:]


def test_a_real_readout_with_the_end_character_on_its_last_data_line():
    ident, published = sie_2wr5()
    assert published[0] == STX and published[-2] == ETX and published[-1:] == b"X"
    # The BCC over the real frame (every byte after STX through ETX), computed independently of bcc(): the
    # published "X" is a placeholder that the source's parser never checks, and we do.
    xor = 0
    for byte in published[1:-1]:
        xor ^= byte
    assert xor == 0x6F == bcc(published[1:-1])
    with pytest.raises(ReadoutError, match="computed 6F") as info:
        parse_readout(published)
    assert info.value.reason == "bcc"
    readout = published[:-1] + bytes([0x6F])

    decoder = Iec62056ReadoutDecoder()
    [sample] = decoder.feed(ident + readout) + decoder.flush()
    assert sample.tags == {"manufacturer": "SIE", "identification": "2WR5"}
    # the data sets of the line that ends in "!" are all there
    last_line = {"obis_6_36_1__text": "2013-11-28", "obis_6_36_5__text": "2000-00-00", "obis_6_36_f2": 1.0,
                 "obis_9_36__text": "2017-01-18&01:36:47", "obis_9_24": 0.6, "obis_9_17": 0.0,
                 "obis_9_1__text": "0&1&0&-&CV&3&2.14", "obis_9_2__text": "&&", "obis_0_0": 10213.0}
    assert {k: sample.fields.get(k) for k in last_line} == last_line
    assert {"obis_9_18", "obis_9_19", "obis_9_25"} <= set(sample.quality)
    # smartmeter-obis counts 50 OBIS entries in this readout (its test's expectation): one field or one
    # not-available flag each here
    assert len(sample.fields) + len(sample.quality) == 50
    assert sample.fields["obis_6_8"] == 29.055 and sample.units["obis_6_8"] == "MWh"
    assert sample.fields["obis_9_20"] == 64030874.0

    # and through the dialogue: a mode B meter ('C': it switches to 2400 baud by itself)
    steps, events = converse(Iec62056Session(), SimMeter(ident=ident, readout=readout))
    assert steps[-1] == Done() and SetBaud(2400) in steps
    assert [type(e) for e in events] == [Sample] and events[0].fields == sample.fields


# -- field names: one name per value, one type per name -------------------------------------------------------------


def test_a_second_value_never_takes_the_name_of_another_code():
    """Before, the second value of `C.D(a)(b)` was named `<name>_2`, which is also the generic name of the code
    C.D.2: one value overwrote the other (first wins), and the field was a string in one readout and a float in
    the next. Now further values are `<generic name>__<n>`, and "__" is in no code's name."""
    multi = b"96.1(ABC)(2301051015)\r\n1.6.0(1.234*kW)(2301051015)(9)\r\n"
    codes = b"96.1.2(5)\r\n1.6.0.2(7*kW)\r\n1.6.0.3(8*kW)\r\n"
    expected = {"obis_96_1__text": "ABC", "obis_96_1__2": "2301051015", "obis_96_1_2": 5.0,
                "obis_1_6_0": 1.234, "obis_1_6_0__2": "2301051015", "obis_1_6_0__3": "9",
                "obis_1_6_0_2": 7.0, "obis_1_6_0_3": 8.0}
    for lines in (multi + codes, codes + multi):  # whichever comes first
        sample = parse_readout(block(lines))
        assert sample.fields == expected
        assert sample.units == {"obis_1_6_0": "kW", "obis_1_6_0_2": "kW", "obis_1_6_0_3": "kW"}


def test_a_code_keeps_its_field_type_when_its_value_is_not_a_number():
    """A code whose value is sometimes a number and sometimes not (a status in hex, a placeholder) gives a float
    under its generic name and a string under `<generic name>__text`, never both types under one name."""
    numeric = parse_readout(block(b"C.5.0(0400)\r\n1.7.0(0.5*kVA)\r\n1.8.1(0.5*kWh)\r\n"))
    text = parse_readout(block(b"C.5.0(04A0)\r\n1.7.0(----*kVA)\r\n1.8.1(n/a*kWh)\r\n"))
    assert numeric.fields == {"obis_96_5_0": 400.0, "obis_1_7_0": 0.5, "energy_import_t1": 0.5}
    assert text.fields == {"obis_96_5_0__text": "04A0", "obis_1_7_0__text": "----", "obis_1_8_1__text": "n/a"}
    # the well-known text codes stay strings under their name, whatever they hold
    assert parse_readout(block(b"C.1.0(12345678)\r\n")).fields == {"serial_number": "12345678"}


_CODE = st.tuples(st.integers(100, 199), st.lists(st.integers(0, 255), min_size=1, max_size=3)).map(
    lambda t: ".".join(map(str, (t[0], *t[1]))))  # C >= 100: no well-known code, so only the generic rule applies
_NUMBER_VALUE = st.decimals(min_value=-99999, max_value=99999, places=3).map(str)
_TEXT_VALUE = st.text(st.sampled_from("ABCXYZ-:&/ "), min_size=1, max_size=8).filter(lambda v: v.strip())
_DATA_SET = st.tuples(_CODE, st.one_of(_NUMBER_VALUE, _TEXT_VALUE),
                      st.lists(st.one_of(_NUMBER_VALUE, _TEXT_VALUE), max_size=3))


@settings(max_examples=300, deadline=None)
@given(sets=st.lists(_DATA_SET, min_size=1, max_size=12, unique_by=lambda s: s[0]), per_line=st.integers(1, 3),
       bang_on_data_line=st.booleans())
def test_every_value_of_every_code_gets_a_name_of_its_own_and_of_one_type(sets, per_line, bang_on_data_line):
    lines = []
    for i in range(0, len(sets), per_line):
        lines.append(b"".join(f"{code}({first})".encode() + b"".join(f"({v})".encode() for v in extra)
                              for code, first, extra in sets[i:i + per_line]))
    data = b"\r\n".join(lines) + (b"" if bang_on_data_line else b"\r\n")
    events = Iec62056ReadoutDecoder().feed(block(data))
    assert [type(e) for e in events] == [Sample]
    fields = events[0].fields
    expected: dict[str, object] = {}
    for code, first, extra in sets:
        generic = "obis_" + code.replace(".", "_")
        number = first.strip().lstrip("+-").replace(".", "", 1).isdigit()
        expected[generic if number else generic + "__text"] = float(first) if number else first.strip()
        for n, value in enumerate(extra, start=2):
            expected[f"{generic}__{n}"] = value.strip()
    assert fields == expected  # nothing lost, nothing overwritten
    for name, value in fields.items():  # the type follows from the name alone
        assert type(value) is (str if "__" in name else float), name


# -- the capture decoder -----------------------------------------------------------------------------------------


def with_parity(data: bytes) -> bytes:
    """7E1 bytes as an 8N1 port reads them: the even parity bit in bit 7."""
    return bytes(b | 0x80 if bin(b).count("1") % 2 else b for b in data)


def build_capture() -> bytes:
    """SYNTHETIC: what an echoing optical head delivers over three readouts, line noise, a wrong BCC, a line that
    is not data, a readout read at 8N1 and a block cut off at the end."""
    cycle_3 = (b"/?!\r\n/ISk5MT174-0001\r\n" + option_select(9600)
               + block(b"1-0:1.8.0*255(0012346.001*kWh)\r\n1-0:1.6.0(0003.210*kW)(2301041830)\r\n"
                       b"this is not a data line\r\n0-0:96.1.0(71234567)\r\n"))
    return (b"/?!\r\n/ISk5MT174-0001\r\n" + option_select(9600) + block(READOUT)
            + b"\x00\xff\xfe\x80"
            + b"/?!\r\n/ISk5MT174-0001\r\n" + option_select(9600) + block(READOUT, good=False)
            + with_parity(cycle_3)
            + b"/?!\r\n/ISk5MT174-0001\r\n" + option_select(9600) + block(READOUT)[:40])


def as_json(event) -> dict:
    if isinstance(event, Rejected):
        return {"rejected": event.reason, "offset": event.offset, "length": event.length}
    return {"fields": event.fields, "units": event.units, "tags": event.tags, "quality": event.quality,
            "time_ns": event.time_ns}


def test_capture_file_is_what_build_capture_writes():
    path = GOLDEN / "capture_synthetic.bin"
    if WRITE:
        path.write_bytes(build_capture())
    assert path.read_bytes() == build_capture()


def test_golden_capture():
    decoder = Iec62056ReadoutDecoder()
    got = [as_json(e) for e in decoder.feed((GOLDEN / "capture_synthetic.bin").read_bytes()) + decoder.flush()]
    path = GOLDEN / "expected_capture.json"
    if WRITE:
        path.write_text("[\n" + ",\n".join(json.dumps(item) for item in got) + "\n]\n")
    assert got == json.loads(path.read_text())
    assert [e.get("rejected", "sample") for e in got] == ["sample", "garbage", "bcc", "malformed", "sample", "incomplete"]
    assert got[0]["fields"] == READOUT_FIELDS
    assert got[4]["fields"] == {"energy_import": 12346.001, "obis_1_6_0": 3.21, "obis_1_6_0__2": "2301041830",
                                "serial_number": "71234567"}
    assert decoder.stats["requests"] == 4 and decoder.stats["option_selects"] == 4


def test_capture_decodes_through_the_protocol_table():
    from edge_agent.serial.protocols import protocol_info

    decoder = protocol_info("iec62056-21").make_decoder(None)
    events = decoder.feed(build_capture()) + decoder.flush()
    assert sum(isinstance(e, Sample) for e in events) == 2


def test_split_at_every_byte_gives_the_same_events():
    data = build_capture() + b"garbage /LGZ\r\n\x01X\x06\x06050\r\n\x06abc\r\n\x02" + b"x" * 400 + block(READOUT) + b"\x02partial"
    whole = Iec62056ReadoutDecoder(max_block=300)
    expected = whole.feed(data) + whole.flush()
    split = Iec62056ReadoutDecoder(max_block=300)
    got = []
    for i in range(len(data)):
        got += split.feed(data[i:i + 1])
        assert len(split._buf) <= split.max_buffer
    assert got + split.flush() == expected
    assert {e.reason for e in expected if isinstance(e, Rejected)} >= {"garbage", "bcc", "too_long", "malformed",
                                                                       "truncated", "incomplete"}


def test_a_block_broken_off_by_a_new_one_is_truncated_and_the_new_one_decodes():
    events = Iec62056ReadoutDecoder().feed(block(READOUT)[:30] + block(READOUT))
    assert [(type(e).__name__, getattr(e, "reason", "")) for e in events] == [("Rejected", "truncated"), ("Sample", "")]
    assert (events[0].offset, events[0].length) == (0, 30)


@settings(max_examples=150, deadline=None)
@given(junk=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 4000), max_size=10),
       sprinkle=st.lists(st.sampled_from([b"\x01", b"\x02", b"\x03", b"\x04", b"\x06", b"/", b"\r\n", b"\x01P0",
                                          b"/?!\r\n", b"!\r\n\x03"]), max_size=30))
def test_junk_never_raises_keeps_the_buffer_bounded_and_resynchronises(junk, cuts, sprinkle):
    for i, piece in enumerate(sprinkle):
        at = (i * 89) % (len(junk) + 1)
        junk = junk[:at] + piece + junk[at:]
    good = b"/LGZ5ZMD\r\n" + block(READOUT)
    data = junk + b"\x03\x00" + good
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    decoder = Iec62056ReadoutDecoder(max_block=512)
    events = []
    for a, b in itertools.pairwise(bounds):
        events += decoder.feed(data[a:b])
        assert len(decoder._buf) <= decoder.max_buffer
    events += decoder.flush()
    whole = Iec62056ReadoutDecoder(max_block=512)
    assert events == whole.feed(data) + whole.flush()
    assert isinstance(events[-1], Sample) and events[-1].fields == READOUT_FIELDS
    offsets = [e.offset for e in events if isinstance(e, Rejected)]
    assert offsets == sorted(offsets)
    assert all(e.length > 0 and e.offset >= 0 and e.offset + e.length <= len(data)
               for e in events if isinstance(e, Rejected))


# -- the dialogue, against a simulated meter ----------------------------------------------------------------------


class SimMeter:
    """A mode C meter behind an optical head. `receive(bytes, line_baud)` -> what it sends back, as (bytes, baud)
    pieces. It only understands what arrives at its own baud rate; after a readout it is back at 300 baud."""

    def __init__(self, ident: bytes = b"/LGZ5ZMD120AR\r\n", readout: bytes | None = None, address: str = "",
                 echo: bool = False, answer: bool = True, after_ident: bytes = b"") -> None:
        self.ident = ident
        self.readout = block(READOUT) if readout is None else readout
        self.address = address
        self.echo = echo
        self.answer = answer
        self.after_ident = after_ident
        self.baud = 300
        self.state = "idle"
        self.heard: list[bytes] = []
        self.option_bauds: list[int] = []

    def receive(self, data: bytes, line_baud: int) -> list[tuple[bytes, int]]:
        out = [(data, line_baud)] if self.echo else []
        if line_baud != self.baud:
            return out  # framing errors: the meter hears nothing
        self.heard.append(data)
        if not self.answer:
            return out
        if self.state == "idle" and data.startswith(b"/?") and data.endswith(b"!\r\n"):
            address = data[2:-3].decode()
            if address in ("", self.address):
                self.state = "ident"
                out.append((self.ident + self.after_ident, 300))
                mode_char = chr(self.ident[4])
                if not mode_char.isdigit():  # mode A/B: the readout follows without an option select
                    baud = {"A": 600, "B": 1200, "C": 2400, "D": 4800, "E": 9600, "F": 19200}.get(mode_char, 300)
                    out.append((self.readout, baud))
                    self.state = "idle"
        elif self.state == "ident" and len(data) == 6 and data[0] == ACK:
            baud = 300 * 2 ** int(chr(data[2]))
            offered = 300 * 2 ** int(chr(self.ident[4]))
            self.option_bauds.append(baud)
            self.state = "idle"
            if data[1:2] == b"0" and data[3:4] == b"0" and baud <= offered:
                out.append((self.readout, baud))
        return out


def garble(data: bytes, sent_at: int, heard_at: int | None) -> bytes:
    """What a UART at `heard_at` makes of bytes sent at `sent_at` baud."""
    if heard_at == sent_at:
        return data
    return bytes([0x7F if sent_at > (heard_at or 0) else 0x00]) * max(1, len(data) * (heard_at or 300) // sent_at)


def converse(session: Iec62056Session, meter: SimMeter, chunk: int = 64, obey_set_baud: bool = True):
    """Drive the session like a driver would, with the meter on the other end: each Expect hears the meter's next
    message (as the master's baud rate hears it), or times out when there is none. -> (steps, events)."""
    master_baud: int | None = None
    pending: list[tuple[bytes, int]] = []
    steps, events = [], []
    for _ in range(10_000):
        step = session.next_step()
        steps.append(step)
        if isinstance(step, Send):
            pending += meter.receive(step.data, master_baud)  # type: ignore[arg-type]
        elif isinstance(step, SetBaud):
            if obey_set_baud or master_baud is None:
                master_baud = step.baud
        elif isinstance(step, Expect):
            heard = garble(*pending.pop(0), master_baud) if pending else b""
            if not heard:
                events += session.timeout()
                continue
            for i in range(0, len(heard), chunk):
                events += session.feed(heard[i:i + chunk])
        else:
            return steps, events
    raise AssertionError("the session did not end")


def test_full_dialogue_switches_to_9600():
    session = Iec62056Session()
    meter = SimMeter()
    steps, events = converse(session, meter)
    assert steps[:3] == [SetBaud(300), Send(b"/?!\r\n"), Expect("identification", steps[2].timeout_s)]
    assert steps[3:6] == [Send(b"\x06050\r\n", 0.3), SetBaud(9600, pytest.approx(0.3)), Expect("readout", 3.0)]
    assert steps[-1] == Done()
    assert 0.2 <= steps[4].delay_s < 0.4  # after the option select has left (6 bytes at 300 baud = 200 ms)
    assert 1.5 < steps[2].timeout_s < 5
    [sample] = events
    assert sample.fields == READOUT_FIELDS and sample.tags == {"manufacturer": "LGZ", "identification": "ZMD120AR"}
    assert meter.heard == [b"/?!\r\n", b"\x06050\r\n"]
    assert session.identification.baud == 9600 and session.baud == 9600 and session.sample == sample
    assert session.next_step() == Done() and session.feed(b"more") == [] and session.timeout() == []


@pytest.mark.parametrize(("meter_char", "max_baud", "baud"), [("5", 2400, 2400), ("3", 9600, 2400), ("6", 19200, 19200),
                                                               ("4", 300, 300), ("0", 9600, 300)])
def test_baud_negotiation(meter_char, max_baud, baud):
    session = Iec62056Session(max_baud=max_baud)
    meter = SimMeter(ident=f"/ABC{meter_char}meter\r\n".encode())
    steps, events = converse(session, meter)
    assert steps[-1] == Done() and isinstance(events[-1], Sample)
    assert meter.option_bauds == [baud]
    switches = [s.baud for s in steps if isinstance(s, SetBaud)]
    assert switches == ([300] if baud == 300 else [300, baud])


def test_the_readout_is_lost_without_the_baud_switch():
    steps, events = converse(Iec62056Session(), SimMeter(), obey_set_baud=False)
    assert isinstance(steps[-1], Failed) and steps[-1].reason in ("timeout", "garbage")
    assert not any(isinstance(e, Sample) for e in events)


def test_device_address():
    steps, events = converse(Iec62056Session("12345678"), SimMeter(address="12345678"))
    assert steps[1] == Send(b"/?12345678!\r\n") and steps[-1] == Done()
    steps, events = converse(Iec62056Session("87654321"), SimMeter(address="12345678"))
    assert steps[-1].reason == "timeout" and "identification" in steps[-1].detail and events == []


def test_mode_a_and_mode_b_meters():
    steps, events = converse(Iec62056Session(), SimMeter(ident=b"/ABC@meter\r\n"))
    assert [s for s in steps if isinstance(s, Send)] == [Send(b"/?!\r\n")]  # no option select
    assert steps[-1] == Done() and events[-1].tags["identification"] == "meter"
    steps, events = converse(Iec62056Session(), SimMeter(ident=b"/ABCEmeter\r\n"))
    assert [s for s in steps if isinstance(s, SetBaud)] == [SetBaud(300), SetBaud(9600)]
    assert steps[-1] == Done()
    steps, _ = converse(Iec62056Session(max_baud=2400), SimMeter(ident=b"/ABCEmeter\r\n"))
    assert steps[-1].reason == "unsupported"


def test_an_echoing_head_is_no_trouble():
    steps, events = converse(Iec62056Session(), SimMeter(echo=True), chunk=3)
    assert steps[-1] == Done() and [type(e) for e in events] == [Sample]


def test_bad_bcc_fails_the_session():
    steps, events = converse(Iec62056Session(), SimMeter(readout=block(READOUT, good=False)))
    assert steps[-1].reason == "bcc"
    assert [e.reason for e in events] == ["bcc"]


def test_no_answer_times_out():
    steps, events = converse(Iec62056Session(), SimMeter(answer=False))
    assert steps[-1] == Failed("timeout", "no identification (address '')") and events == []


def test_no_readout_times_out():
    meter = SimMeter(readout=b"")
    steps, _ = converse(Iec62056Session(), meter)
    assert steps[-1].reason == "timeout" and "readout at 9600 baud" in steps[-1].detail


def test_readout_cut_off_times_out_with_incomplete():
    session = Iec62056Session()
    meter = SimMeter(readout=block(READOUT)[:100])
    steps, events = converse(session, meter)
    assert steps[-1].reason == "timeout" and "complete readout" in steps[-1].detail
    assert [(e.reason, e.length) for e in events] == [("incomplete", 100)]


def test_garbage_before_the_identification_is_reported_and_survived():
    class Noisy(SimMeter):
        def receive(self, data, line_baud):
            return [(b"\xff\x00 noise \xfe", 300), *super().receive(data, line_baud)]

    steps, events = converse(Iec62056Session(), Noisy())
    assert steps[-1] == Done()
    assert [type(e).__name__ for e in events] == ["Rejected", "Sample"] and events[0].reason == "garbage"


def test_a_readout_without_etx_fails_as_too_long_a_stray_long_line_does_not():
    session = Iec62056Session()
    steps, events = converse(session, SimMeter(readout=b"\x02" + b"1.8.0(1)\r\n" * 4000))
    assert steps[-1].reason == "too_long" and events[-1].length == session.decoder.max_block
    steps, events = converse(Iec62056Session(), SimMeter(readout=b"/" + b"x" * 200 + b"\x06abcdefgh" + block(READOUT)))
    assert steps[-1] == Done()
    assert [e.reason for e in events if isinstance(e, Rejected)] == ["too_long", "garbage", "malformed", "garbage"]


def test_endless_garbage_fails_the_session():
    class Babbler(SimMeter):
        def receive(self, data, line_baud):
            return [(b"\x7f\x55" * 400, 300)]

    steps, _ = converse(Iec62056Session(), Babbler())
    assert steps[-1].reason == "garbage"


def test_split_at_every_byte():
    steps, events = converse(Iec62056Session(), SimMeter(echo=True), chunk=1)
    assert steps[-1] == Done() and events[-1].fields == READOUT_FIELDS


def test_a_readout_without_option_select_after_the_identification_in_one_chunk():
    # a mode C meter that does not wait for the option select (some do after a timeout): the readout is taken
    steps, events = converse(Iec62056Session(), SimMeter(after_ident=block(READOUT)))
    assert steps[-1] == Done() and events[-1].fields == READOUT_FIELDS


def test_session_arguments():
    with pytest.raises(ValueError):
        Iec62056Session(max_baud=115200)
    with pytest.raises(ValueError):
        Iec62056Session(address="a/b")


# -- the asyncio driver ---------------------------------------------------------------------------------------------


class SimPort:
    """An async port in front of a SimMeter: writes go to the meter at the port's baud; reads return its answer
    as the port's baud hears it."""

    def __init__(self, meter: SimMeter) -> None:
        self.meter = meter
        self.baud = 1200
        self.pending: list[tuple[bytes, int]] = []
        self.log: list[tuple[str, object, float]] = []

    def write(self, data: bytes) -> None:
        self.log.append(("write", data, time.monotonic()))
        self.pending += self.meter.receive(data, self.baud)

    def set_baud(self, baud: int) -> None:
        self.log.append(("baud", baud, time.monotonic()))
        self.baud = baud

    async def read(self, timeout: float | None = None) -> bytes:
        await asyncio.sleep(0)
        if not self.pending:
            return b""
        data = b"".join(garble(d, b, self.baud) for d, b in self.pending)
        self.pending = []
        return data


def test_run_session_keeps_the_timing():
    port = SimPort(SimMeter())
    events = asyncio.run(run_session(Iec62056Session(), port))
    assert isinstance(events[-1], Sample) and events[-1].fields == READOUT_FIELDS
    kinds = [(kind, value) for kind, value, _ in port.log]
    assert kinds == [("baud", 300), ("write", b"/?!\r\n"), ("write", b"\x06050\r\n"), ("baud", 9600)]
    times = [t for _, _, t in port.log]
    assert times[2] - times[1] >= 0.29  # the reaction time before the option select
    assert 0.29 <= times[3] - times[2] < 0.45  # the switch: after the option select has left, before the answer


def test_run_session_skips_a_switch_to_the_rate_the_port_has():
    port = SimPort(SimMeter(ident=b"/ABC0meter\r\n"))  # a 300 baud meter
    port.baud = 300
    events = asyncio.run(run_session(Iec62056Session(), port))
    assert isinstance(events[-1], Sample)
    assert [kind for kind, _, _ in port.log] == ["write", "write"]  # request, option select; no set_baud


def test_run_dialogue_emits_readings_and_counts_failures():
    readings: list = []
    stats: Counter[str] = Counter()

    class Source:
        device = SimpleNamespace(id="meter1", address="", max_baud=9600, interval=3600.0)
        stream = SimPort(SimMeter())

        def readings(self, events, now_ns):
            return [e for e in events if isinstance(e, Sample)]

    source = Source()
    source.stats = stats

    async def main():
        task = asyncio.ensure_future(run_dialogue(source, readings.extend))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if readings:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(readings) == 1 and readings[0].fields == READOUT_FIELDS
    assert source.stream.baud == 300  # left at the sign-on rate for the next readout

    source.stream = SimPort(SimMeter(answer=False))
    readings.clear()

    async def failing():
        task = asyncio.ensure_future(run_dialogue(source, readings.extend))
        for _ in range(500):
            await asyncio.sleep(0.01)
            if stats:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(failing())
    assert stats == {"iec62056.timeout": 1} and readings == []


def test_the_dialogue_through_a_serial_source_on_a_pty():
    """The real port code (pyserial on a pty: baud changes are accepted, not enforced) and SerialSource."""
    from edge_agent.serial.config import SerialDevice
    from edge_agent.serial.source import SerialSource
    from labkit.serial_devices import QueryDevice

    def answer(request: bytes) -> bytes | None:
        if request.startswith(b"/?"):
            return b"/LGZ5ZMD120AR\r\n"
        return block(READOUT) if request.startswith(bytes([ACK])) else None

    meter = QueryDevice(answer, quiet=0.05)
    try:
        source = SerialSource(SerialDevice(id="m1", port=meter.device, protocol="iec62056-21", interval=60.0))
        [reading] = asyncio.run(source.once(5.0))
    finally:
        meter.close()
    assert reading.fields == READOUT_FIELDS and reading.measurement == "electricity"
    assert reading.tags == {"manufacturer": "LGZ", "identification": "ZMD120AR"}
    assert meter.requests == [b"/?!\r\n", b"\x06050\r\n"]
