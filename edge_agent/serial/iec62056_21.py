"""IEC 62056-21 (formerly IEC 61107) mode C data readout: the sign-on dialogue as a sans-IO state machine, the
readout's decoding, and a `StreamDecoder` for capture files. Everything above `run_session` is pure.

The dialogue (mode C, 7 data bits, even parity, 1 stop bit throughout):

    master, 300 baud   /?<address>!CR LF                  request; address optional (up to 32 of 0-9 A-Z a-z space)
    meter,  300 baud   /XXXZ<ident>CR LF                  identification: XXX manufacturer, Z baud character
    master, 300 baud   ACK 0 Z' 0 CR LF                   option select: normal protocol, baud Z', data readout
    both switch to Z' (the meter after its reaction time, at least 200 ms after the ACK's last byte)
    meter,  Z' baud    STX <data lines> ! CR LF ETX BCC   the readout; BCC = XOR of the bytes after STX through ETX

Baud characters: mode C '0'..'6' = 300, 600, 1200, 2400, 4800, 9600, 19200; mode B 'A'..'F' = 600..19200 (the
meter switches by itself right after its identification, no option select); any other character is mode A
(no switch: the readout follows at 300 baud). An identification may carry `\\W` (enhanced capability, e.g. `\\2`
for mode E): read and kept, the readout still uses mode C. A lower-case third manufacturer letter means the meter
answers within 20 ms instead of 200 ms; the dialogue keeps the 200 ms timing, which every meter accepts.

Data lines are data sets `address(value*unit)`, several per line possible, a set may carry more values
(`1.6.0(1.234*kW)(2301051015)`: the maximum and its time). The address is an OBIS code in short form (`1.8.0`,
`C.1.0`, `F.F`) or long form (`1-0:1.8.0*255`). The end character `!` closes the data block (§6.3, the data
message `STX data block ! CR LF ETX BCC`); most meters send it on a line of its own, some right after the last
data set (`...0.0(00010213)!` CR LF ETX BCC): both are read, the data sets of that last line included.

Driving `Iec62056Session` (the one protocol a driver has to keep; `run_session` below is that driver):

    session = Iec62056Session(address="", max_baud=9600)
    sent_at = now()
    loop:
        step = session.next_step()
        Send(data, delay_s):      sleep delay_s; sent_at = now(); write data
        SetBaud(baud, delay_s):   sleep until sent_at + delay_s (no sleep if that has passed); set the port's baud
                                  (a port already at that rate is left alone)
        Expect(what, timeout_s):  read what arrives, waiting at most timeout_s;
                                  bytes -> events += session.feed(bytes)     (any split, any amount)
                                  silence for timeout_s -> events += session.timeout()
        Done():                   stop; events hold the readout's Sample
        Failed(reason, detail):   stop; events hold Rejected records saying what went wrong

`Send` and `SetBaud` are one-shot: once returned, the session takes them as done, and the next call returns the
next step. `Expect` is returned again and again until `feed` has completed what it waits for (so the silence
timer restarts with every chunk of bytes) or `timeout()` ends the session with Failed("timeout"). The session
starts with SetBaud(300) (the previous session may have left the port at 9600). `feed` returns the events for the
bytes given (Rejected garbage, malformed lines, bad BCC, and finally the Sample); it may be called at any step
(bytes read while no Expect was pending) and ignores bytes after Done/Failed.

Failure reasons (stable): "timeout" (no identification, or no or incomplete readout), "bcc" (the readout's block
check character is wrong: the session does not ask again; the next interval does), "too_long" (no ETX within the
block limit), "garbage" (too many bytes that are neither identification nor readout), "unsupported" (a mode B
baud rate above max_baud, or a reserved baud character).

Decoding: `parse_readout(block)` turns `STX ... ETX BCC` into a Sample, `parse_identification(line)` reads the
identification, `bcc(data)` is the block check. Field names: a few well-known OBIS codes get the shared
vocabulary's names (wire/vocabulary.toml: energy_import, power_import, voltage_l1, ...) in its units (kWh, kvarh,
W, V, A, Hz; converted from Wh/MWh, kW/MW, kV when the meter uses those; a unit that does not fit keeps the generic
name), every other code becomes `obis_` + its digits
(`1.8.0*03` -> obis_1_8_0_f3; the letters C F L P of short codes are 96 97 98 99, so `C.1.0` and `0-0:96.1.0`
name the same field; `1-0:` is the default of an electricity meter's short codes and is dropped). Numbers
become floats with their unit in `Sample.units`; an empty value `()` is left out with quality "not_available".
The meter's own time and date (0.9.1 hhmmss, 0.9.2 YYMMDD) become the string fields meter_time and meter_date;
the sample's time stays the gateway's.

Every field has one type, whatever a reading holds (InfluxDB refuses a field that changes type), and no two
values of one readout can get one name. Suffixes start with "__" (SEPARATOR), which no code's name contains:
a well-known name is fixed, a generic one is "obis_" and non-empty groups joined by single underscores. So:
- `<name>`: the first value of a data set; a float, except for the well-known text codes (meter_time,
  meter_date, address, serial_number, error_register: always strings);
- `<generic name>__text`: a first value that is not a number where a number would go (`C.90.1(TEXT)`,
  `1.8.1(n/a*kWh)` -> obis_96_90_1__text, obis_1_8_1__text): a string;
- `<generic name>__2`, `__3` ...: the further values of a data set, always strings, always after the code's
  generic name (`1.6.0(1.234*kW)(2301051015)` -> obis_1_6_0 = 1.234, obis_1_6_0__2 = "2301051015").
Before, the second value was `<name>_2`, which is also the generic name of the code with one more group
(`96.1(a)(b)` and `96.1.2(5)` both made obis_96_1_2): one value overwrote the other, and the field was a
string in one readout and a float in the next.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

from edge_agent.serial.base import Event, JunkRun, Rejected, Sample
from wire.logs import RateLimitedLog
from wire.schema import FieldValue

SOH, STX, ETX, EOT, ACK, NAK = 0x01, 0x02, 0x03, 0x04, 0x06, 0x15

BAUD_MODE_C = {"0": 300, "1": 600, "2": 1200, "3": 2400, "4": 4800, "5": 9600, "6": 19200}
BAUD_MODE_B = {"A": 600, "B": 1200, "C": 2400, "D": 4800, "E": 9600, "F": 19200}
MODE_B_RESERVED = "GHI"
BAUD_CHAR_C = {baud: char for char, baud in BAUD_MODE_C.items()}

MAX_BLOCK = 32 * 1024  # a readout longer than this is not a readout
MAX_IDENT_LINE = 128
MAX_VALUE = 128  # the standard allows 32 characters per value, 16 per unit; some meters are generous
MAX_EXTRA_VALUES = 8  # values kept per data set, the first included
# Field name suffixes (module docstring): no code's own name contains SEPARATOR, so a suffixed name is never a
# code's name, and each suffix has one type (TEXT and the value numbers: strings).
SEPARATOR = "__"
TEXT_SUFFIX = SEPARATOR + "text"

REACTION_S = 0.3  # between the meter's message and our answer: the standard's 200 ms <= tr <= 1500 ms
FIRST_BYTE_S = 1.5  # the standard's longest reaction time
SILENCE_S = 3.0  # the longest pause tolerated inside an answer (the standard: 1500 ms) and before a readout
MAX_IDENT_GARBAGE = 512  # bytes without an identification before the session gives up
MAX_READOUT_GARBAGE = 1024  # bytes outside the readout block before the session gives up

_SEVEN_BIT = bytes(b & 0x7F for b in range(256))
_BLANK = b"\r\n\x00"
_ADDRESS = re.compile(r"[0-9A-Za-z ]{0,32}")
# printable, without "/" and "!" (and "\" for the baud character, which starts "\W")
_IDENT = re.compile(r"/([A-Za-z]{3})([\x22-\x2e\x30-\x5b\x5d-\x7e])((?:\\[\x22-\x2e\x30-\x7e])*)([\x20\x22-\x2e\x30-\x7e]*)")
_OPTION_SELECT = re.compile(rb"\x06[0-9][0-9A-Z][0-9]\r?\n")
_DATASET = re.compile(r"([^()]*)\(([^()]*)\)")
_OBIS = re.compile(r"(?:(\d{1,3})-(\d{1,3}):)?([0-9A-Za-z]{1,3}(?:\.[0-9A-Za-z]{1,3}){0,3})(?:[*&](\d{1,3}))?")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_SHORT_LETTERS = {"c": "96", "f": "97", "l": "98", "p": "99"}


def bcc(data: bytes) -> int:
    """Block check character: XOR of `data`, 7 bits. For a block, `data` is what follows the first SOH (or STX,
    if there is no SOH) up to and including ETX (or EOT)."""
    value = 0
    for byte in data:
        value ^= byte
    return value & 0x7F


class ReadoutError(ValueError):
    """A message that cannot be used; `reason` is a stable code ("bcc", "malformed")."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# -- identification ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identification:
    manufacturer: str  # three letters, e.g. "LGZ", "ISk"
    baud_char: str
    identification: str  # the meter's type/identification text
    enhanced: str = ""  # the characters of "\W" sequences, "" without

    @property
    def mode(self) -> str:
        """"C" (baud characters 0..6), "B" (A..I) or "A" (anything else: no baud rate switch)."""
        if self.baud_char in BAUD_MODE_C:
            return "C"
        return "B" if self.baud_char in BAUD_MODE_B or self.baud_char in MODE_B_RESERVED else "A"

    @property
    def baud(self) -> int | None:
        """Mode C: the highest baud rate the meter offers; mode B: the one it switches to; mode A: 300;
        None for a reserved mode B character."""
        if self.mode == "A":
            return 300
        return BAUD_MODE_C.get(self.baud_char) or BAUD_MODE_B.get(self.baud_char)

    @property
    def fast_reaction(self) -> bool:
        """A lower-case third manufacturer letter: the meter answers within 20 ms (the standard's tr >= 20 ms)."""
        return self.manufacturer[2].islower()


def parse_identification(line: bytes | str) -> Identification:
    """`/XXXZ[\\W]ident` with or without its CR LF. Raises ReadoutError("malformed")."""
    text = line.decode("ascii", "replace") if isinstance(line, bytes) else line
    text = text.rstrip("\r\n")
    m = _IDENT.fullmatch(text)
    if not m:
        raise ReadoutError("malformed", f"not an identification message: {text[:40]!r}")
    return Identification(m[1], m[2], m[4], m[3].replace("\\", ""))


def request(address: str = "") -> bytes:
    """The sign-on request `/?<address>!CR LF`."""
    if not _ADDRESS.fullmatch(address):
        raise ValueError(f"device address {address!r}: up to 32 of 0-9, A-Z, a-z and space")
    return b"/?" + address.encode("ascii") + b"!\r\n"


def option_select(baud: int, protocol: str = "0", mode: str = "0") -> bytes:
    """`ACK V Z Y CR LF`: protocol control V ('0' normal), baud character Z, mode Y ('0' data readout)."""
    return bytes([ACK]) + f"{protocol}{BAUD_CHAR_C[baud]}{mode}".encode("ascii") + b"\r\n"


# -- the readout ---------------------------------------------------------------------------------------------------

# (A-B prefixes this name applies to, name, {unit (lower case): factor to the name's unit}, unit, kind)
_ENERGY = {"kwh": Fraction(1), "wh": Fraction(1, 1000), "mwh": Fraction(1000)}
_REACTIVE = {"kvarh": Fraction(1), "varh": Fraction(1, 1000), "mvarh": Fraction(1000)}
_POWER = {"kw": Fraction(1000), "w": Fraction(1), "mw": Fraction(1_000_000)}
_VOLT = {"v": Fraction(1), "kv": Fraction(1000)}
_AMP = {"a": Fraction(1)}
_HZ = {"hz": Fraction(1)}
_ELECTRICITY = (None, "1-0")
_ABSTRACT = (None, "0-0", "1-0")


@dataclass(frozen=True)
class _Known:
    name: str
    prefixes: tuple[str | None, ...]
    units: dict[str, Fraction] | None = None  # None: a text value
    unit: str = ""


_KNOWN: dict[str, _Known] = {
    "1.8.0": _Known("energy_import", _ELECTRICITY, _ENERGY, "kWh"),
    "2.8.0": _Known("energy_export", _ELECTRICITY, _ENERGY, "kWh"),
    **{f"1.8.{t}": _Known(f"energy_import_t{t}", _ELECTRICITY, _ENERGY, "kWh") for t in range(1, 5)},
    **{f"2.8.{t}": _Known(f"energy_export_t{t}", _ELECTRICITY, _ENERGY, "kWh") for t in range(1, 5)},
    "3.8.0": _Known("reactive_energy_import", _ELECTRICITY, _REACTIVE, "kvarh"),
    "4.8.0": _Known("reactive_energy_export", _ELECTRICITY, _REACTIVE, "kvarh"),
    "1.7.0": _Known("power_import", _ELECTRICITY, _POWER, "W"),
    "2.7.0": _Known("power_export", _ELECTRICITY, _POWER, "W"),
    "32.7.0": _Known("voltage_l1", _ELECTRICITY, _VOLT, "V"),
    "52.7.0": _Known("voltage_l2", _ELECTRICITY, _VOLT, "V"),
    "72.7.0": _Known("voltage_l3", _ELECTRICITY, _VOLT, "V"),
    "31.7.0": _Known("current_l1", _ELECTRICITY, _AMP, "A"),
    "51.7.0": _Known("current_l2", _ELECTRICITY, _AMP, "A"),
    "71.7.0": _Known("current_l3", _ELECTRICITY, _AMP, "A"),
    "14.7.0": _Known("frequency", _ELECTRICITY, _HZ, "Hz"),
    "0.9.1": _Known("meter_time", _ABSTRACT),
    "0.9.2": _Known("meter_date", _ABSTRACT),
    "0.0.0": _Known("address", _ABSTRACT),
    "96.1.0": _Known("serial_number", _ABSTRACT),
    "97.97.0": _Known("error_register", _ABSTRACT),
    "97.97": _Known("error_register", _ABSTRACT),
}


def known_fields() -> dict[str, str]:
    """{field: unit} of the well-known codes (the data catalogue, docs/catalog.md); any other code is stored
    under its generic `obis_...` name, outside the vocabulary."""
    return {k.name: k.unit for k in _KNOWN.values()}


def _obis(address: str) -> tuple[str, _Known | None] | None:
    """OBIS address -> (its generic `obis_...` field name, the well-known entry if one applies); None when the
    address is not an OBIS code."""
    m = _OBIS.fullmatch(address)
    if not m:
        return None
    a, b, groups, billing = m[1], m[2], m[3].lower(), m[4]
    prefix = f"{int(a)}-{int(b)}" if a is not None else None
    short = ".".join(_SHORT_LETTERS.get(g, g) for g in groups.split("."))
    if billing is not None and int(billing) == 255:
        billing = None  # *255: the current value
    parts = ([a, b] if prefix not in (None, "1-0") else []) + short.split(".")
    name = "obis_" + "_".join(str(int(p)) if p.isdigit() else p for p in parts)
    if billing is not None:
        return f"{name}_f{int(billing)}", None
    known = _KNOWN.get(short)
    return name, (known if known is not None and prefix in known.prefixes else None)


def field_name(address: str, unit: str = "") -> str | None:
    """The field a numeric value of an OBIS address (with the unit the meter gave) is stored as; None for a
    non-OBIS address. A value that is not a number goes to the generic name + TEXT_SUFFIX, except for the
    well-known text codes, and further values to the generic name + SEPARATOR + their number."""
    target = _obis(address)
    if target is None:
        return None
    name, known = target
    if known is None:
        return name
    if known.units is not None and unit.lower() not in known.units:
        return name
    return known.name


def _value(raw: str, known: _Known | None) -> tuple[FieldValue, str, bool]:
    """-> (value, unit, whether the well-known name applies: not when the value or its unit does not fit it)."""
    value, _, unit = raw.partition("*")
    value, unit = value.strip(), unit.strip()
    if known is not None and known.units is None:
        return raw.strip(), "", True
    if not _NUMBER.fullmatch(value):
        return value, unit, False
    if known is not None:
        factor = known.units.get(unit.lower()) if known.units else None
        if factor is None:
            return float(value), unit, False  # a unit we would have to guess: keep the generic name
        if factor == 1:
            return float(value), known.unit, True
        return float(Fraction(value) * factor), known.unit, True
    return float(value), unit, True


def _parse_data(content: bytes, tags: dict[str, str], offset: int) -> tuple[Sample, list[Rejected]]:
    """`content`: the bytes between STX and ETX; `offset`: the stream offset of content[0]."""
    fields: dict[str, FieldValue] = {}
    units: dict[str, str] = {}
    quality: dict[str, str] = {}
    rejected: list[Rejected] = []
    for m in re.finditer(rb"[^\r\n]+", content):
        line = m[0].decode("ascii", "replace").strip()
        if line.endswith("!"):
            # §6.3: "!" ends the data block, on its own line or right after the last data set; it never occurs
            # in an address or a value, so it is no part of the data sets before it
            line = line[:-1].rstrip()
        if not line:
            continue
        sets = _datasets(line)
        if sets is None:
            rejected.append(Rejected(offset + m.start(), "malformed", f"not a data line: {line[:60]!r}", len(m[0])))
            continue
        for address, values in sets:
            target = _obis(address)
            if target is None or any(len(v) > MAX_VALUE for v in values):
                rejected.append(Rejected(offset + m.start(), "malformed", f"bad data set {address[:20]!r}",
                                         len(m[0])))
                continue
            generic, known = target
            first = values[0]
            if not first.partition("*")[0].strip():
                quality.setdefault(known.name if known is not None else generic, "not_available")
            else:
                value, unit, use_known = _value(first, known)
                if known is not None and use_known:
                    name = known.name
                elif isinstance(value, str):
                    name = generic + TEXT_SUFFIX  # the generic name holds numbers only: one type per field
                else:
                    name = generic
                if name not in fields:
                    fields[name] = value
                    if unit:
                        units[name] = unit
            for k, extra in enumerate(values[1:MAX_EXTRA_VALUES], start=2):
                if extra.strip():
                    fields.setdefault(f"{generic}{SEPARATOR}{k}", extra.strip())
    for name in fields:
        quality.pop(name, None)
    return Sample(fields, None, None, dict(tags), quality, units), rejected


def _datasets(line: str) -> list[tuple[str, list[str]]] | None:
    """`addr(v)(v2)addr2(v)...` -> [(addr, [v, v2]), ...]; None when the line is not made of data sets."""
    if not line.isprintable():
        return None
    out: list[tuple[str, list[str]]] = []
    pos = 0
    while pos < len(line):
        m = _DATASET.match(line, pos)
        if not m:
            return None
        address = m[1].strip()
        if address:
            out.append((address, [m[2]]))
        elif out:
            out[-1][1].append(m[2])
        else:
            return None
        pos = m.end()
    return out


def parse_readout(block: bytes, identification: Identification | None = None) -> Sample:
    """`STX <data lines> ! CR LF ETX BCC` -> Sample (fields, units; tags from `identification`). Raises
    ReadoutError ("malformed" framing, "bcc"). Lines that are not data sets are skipped; the stream decoder
    reports them."""
    block = block.translate(_SEVEN_BIT)
    if len(block) < 3 or block[0] != STX or block[-2] != ETX:
        raise ReadoutError("malformed", "a readout block is STX ... ETX BCC")
    if ETX in block[1:-2]:
        raise ReadoutError("malformed", "ETX inside the block")
    computed = bcc(block[1:-1])
    if computed != block[-1]:
        raise ReadoutError("bcc", f"block says {block[-1]:02X}, computed {computed:02X}")
    sample, _ = _parse_data(block[1:-2], _tags(identification), 1)
    return sample


def _tags(identification: Identification | None) -> dict[str, str]:
    if identification is None:
        return {}
    tags = {"manufacturer": identification.manufacturer}
    if identification.identification:
        tags["identification"] = identification.identification.strip()
    return tags


# -- the stream decoder ----------------------------------------------------------------------------------------

_STARTS = {ord("/"): "ident", STX: "block", SOH: "command", ACK: "ack"}
# per frame kind: (bytes that end it, bytes that break it off: a new frame starts there, longest length)
_FRAMING: dict[str, tuple[bytes, bytes]] = {
    "ident": (b"\n", bytes([ord("/"), STX, SOH, ACK])),
    "ack": (b"\n", bytes([ord("/"), STX, SOH, ACK])),
    "block": (bytes([ETX]), bytes([STX, SOH])),
    "command": (bytes([ETX, EOT]), bytes([SOH, STX])),  # STX only as the 4th byte (see feed)
}


class Iec62056ReadoutDecoder:
    """A `StreamDecoder` for what comes from an optical head: identification lines, readout blocks, and the
    echo of the master's own messages (a request `/?..!`, an option select `ACK 0Z0`; some heads echo), found
    anywhere in the stream.

    Bytes are taken as 7-bit (the parity bit of a 7E1 line read at 8N1 is dropped), so a capture made at 8N1
    decodes too. A readout block becomes a Sample, tagged with the last identification seen. Rejections:
    "bcc" (a block or programming command with a wrong BCC; the whole frame is skipped), "malformed" (an
    identification line or data line that does not parse, an ACK that is not an option select), "truncated" (a
    frame broken off by the start of another), "too_long" (no end within `max_block` bytes; its bytes are
    dropped), "garbage" (bytes outside frames, other than CR, LF, NUL; one rejection per run of at most
    `max_block` bytes), "incomplete" (at `flush`). Programming-mode frames (SOH ... ETX BCC) with a correct BCC
    are skipped without a record and counted in `stats`.
    """

    def __init__(self, max_block: int = MAX_BLOCK) -> None:
        self.max_block = max_block
        self.max_buffer = max_block + 1
        self.identification: Identification | None = None
        self.identifications = 0  # how many were seen (the session watches this)
        self.stats: Counter[str] = Counter()
        self._offset = 0
        self._buf = bytearray()
        self._kind = ""
        self._start = 0
        self._end_seen = False  # block/command: ETX (or EOT) seen, the BCC byte comes next
        self._junk = JunkRun(self.max_block, "bytes outside IEC 62056-21 messages", _BLANK)

    @property
    def pending_garbage(self) -> int:
        """Bytes of a garbage run not yet reported (it is reported when the next frame starts)."""
        return self._junk.pending

    def _limit(self, kind: str) -> int:
        return {"ident": MAX_IDENT_LINE, "ack": 6}.get(kind, self.max_block)

    def feed(self, data: bytes) -> list[Event]:
        data = data.translate(_SEVEN_BIT)
        events: list[Event] = []
        base = self._offset
        self._offset += len(data)
        pos, n = 0, len(data)
        buf = self._buf
        while pos < n:
            if not buf:
                start = _find_any(data, bytes(_STARTS), pos)
                end = n if start < 0 else start
                if end > pos:
                    self._junk.add(data, pos, end, base, events)
                if start < 0:
                    break
                self._junk.end(events)
                self._kind = _STARTS[data[start]]
                self._start = base + start
                self._end_seen = False
                buf.append(data[start])
                pos = start + 1
                continue
            if self._end_seen:  # the BCC
                buf.append(data[pos])
                pos += 1
                events += self._frame(bytes(buf))
                buf.clear()
                continue
            if self._kind == "command" and len(buf) <= 3:  # SOH, command (P W R E B), its type digit, STX or ETX
                byte = data[pos]
                if len(buf) == 3 and byte == STX:
                    buf.append(byte)
                    pos += 1
                    continue
                if len(buf) < 3:
                    if byte in b"PWREB" if len(buf) == 1 else 0x30 <= byte <= 0x39:
                        buf.append(byte)
                        pos += 1
                    else:
                        events.append(Rejected(self._start, "malformed", "SOH not followed by a command", len(buf)))
                        buf.clear()  # hunt again from this byte
                    continue
            ends, breaks = _FRAMING[self._kind]
            limit = self._limit(self._kind)
            stop = min(n, pos + limit - len(buf))
            hit = _find_any(data, ends + breaks, pos, stop)
            if hit < 0:
                buf += data[pos:stop]
                pos = stop
                if len(buf) >= limit:
                    if self._kind == "ack":
                        events.append(Rejected(self._start, "malformed", "ACK not followed by an option select",
                                               len(buf)))
                    else:
                        events.append(Rejected(self._start, "too_long", f"no end of {self._kind} within {limit} "
                                                                        "bytes", len(buf)))
                    buf.clear()
                continue
            if data[hit] in breaks:
                buf += data[pos:hit]
                if not (self._kind == "ack" and len(buf) == 1):  # a lone ACK (programming mode) is fine
                    events.append(Rejected(self._start, "truncated", f"{self._kind} broken off by a new frame",
                                           len(buf)))
                buf.clear()
                pos = hit
                continue
            buf += data[pos:hit + 1]
            pos = hit + 1
            if self._kind in ("block", "command"):
                self._end_seen = True
            else:
                events += self._frame(bytes(buf))
                buf.clear()
        return events

    def flush(self) -> list[Event]:
        events: list[Event] = []
        if self._buf:
            if not (self._kind == "ack" and len(self._buf) == 1):
                events.append(Rejected(self._start, "incomplete", f"the stream ended inside a {self._kind}",
                                       len(self._buf)))
            self._buf.clear()
        self._junk.end(events)
        return events


    def _frame(self, frame: bytes) -> list[Event]:
        offset, kind = self._start, self._kind
        if kind == "ident":
            if frame.startswith(b"/?"):
                self.stats["requests"] += 1
                return []
            try:
                self.identification = parse_identification(frame)
            except ReadoutError as exc:
                return [Rejected(offset, exc.reason, exc.detail, len(frame))]
            self.identifications += 1
            return []
        if kind == "ack":
            if _OPTION_SELECT.fullmatch(frame):
                self.stats["option_selects"] += 1
                return []
            return [Rejected(offset, "malformed", f"ACK not followed by an option select: {frame!r}", len(frame))]
        computed = bcc(frame[1:-1])
        if computed != frame[-1]:
            return [Rejected(offset, "bcc", f"{kind} says {frame[-1]:02X}, computed {computed:02X}", len(frame))]
        if kind == "command":
            self.stats["commands"] += 1
            return []
        self.stats["readouts"] += 1
        sample, rejected = _parse_data(frame[1:-2], _tags(self.identification), offset + 1)
        return [*rejected, sample]


def _find_any(data: bytes, chars: bytes, start: int, stop: int | None = None) -> int:
    best = -1
    for ch in chars:
        i = data.find(ch, start, stop if best < 0 else best)
        if i >= 0:
            best = i
    return best


# -- the dialogue ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    data: bytes
    delay_s: float = 0.0  # wait this long first (the standard's reaction time after the meter's message)


@dataclass(frozen=True)
class SetBaud:
    baud: int
    delay_s: float = 0.0  # switch this long after the start of the last Send (at once if that has passed)


@dataclass(frozen=True)
class Expect:
    what: str  # "identification" or "readout"
    timeout_s: float  # the longest silence: read at most this long before calling timeout()


@dataclass(frozen=True)
class Done:
    pass


@dataclass(frozen=True)
class Failed:
    reason: str
    detail: str = ""


Step = Send | SetBaud | Expect | Done | Failed


def _transmit_s(n_bytes: int, baud: int) -> float:
    return n_bytes * 10 / baud  # start + 7 data + parity + stop


class Iec62056Session:
    """One mode C readout: sign-on, baud switch, readout. Pure; see the module docstring for the driver protocol."""

    def __init__(self, address: str = "", max_baud: int = 9600) -> None:
        if max_baud not in BAUD_CHAR_C:
            raise ValueError(f"max_baud {max_baud}: expected one of {', '.join(map(str, BAUD_CHAR_C))}")
        self.address = address
        self.max_baud = max_baud
        self._request = request(address)
        self.decoder = Iec62056ReadoutDecoder()
        self.identification: Identification | None = None
        self.baud = 300  # the baud rate the readout comes at
        self.sample: Sample | None = None
        self._steps: list[Step] = [SetBaud(300), Send(self._request)]
        self._state = "identification"
        self._end: Done | Failed | None = None
        self._garbage = 0

    @property
    def finished(self) -> bool:
        return self._end is not None

    def next_step(self) -> Step:
        if self._steps:
            return self._steps.pop(0)
        if self._end is not None:
            return self._end
        if self._state == "identification":
            return Expect("identification", _transmit_s(len(self._request), 300) + FIRST_BYTE_S + 1.0)
        return Expect("readout", SILENCE_S)

    def feed(self, data: bytes) -> list[Event]:
        if self._end is not None or not data:
            return []
        seen = self.decoder.identifications
        events = self.decoder.feed(data)
        if self._state == "identification" and self.decoder.identifications != seen:
            self._identified(self.decoder.identification)  # type: ignore[arg-type]
        for event in events:
            if isinstance(event, Sample):
                self.sample = event
                self._finish(Done())
                return events
            fatal = event.reason == "bcc" or (event.reason == "too_long" and event.length >= self.decoder.max_block)
            if self._state == "readout" and fatal:  # a readout (or command) block, not a stray line
                self._finish(Failed(event.reason, event.detail))
                return events
            self._garbage += event.length
        limit = MAX_IDENT_GARBAGE if self._state == "identification" else MAX_READOUT_GARBAGE
        junk = self._garbage + self.decoder.pending_garbage
        if self._end is None and junk > limit:
            self._finish(Failed("garbage", f"{junk} bytes that are no {self._state}"))
        return events

    def timeout(self) -> list[Event]:
        """The driver waited an Expect's timeout_s without a byte: the session fails."""
        if self._end is not None:
            return []
        events = self.decoder.flush()
        what = "identification" if self._state == "identification" else f"readout at {self.baud} baud"
        if any(isinstance(e, Rejected) and e.reason == "incomplete" for e in events):
            what = f"complete {what}"
        self._finish(Failed("timeout", f"no {what} (address {self.address!r})"))
        return events

    def _identified(self, ident: Identification) -> None:
        self.identification = ident
        self._state = "readout"
        self._garbage = 0
        if ident.mode == "A":
            return  # the readout follows at 300 baud
        if ident.mode == "B":
            if ident.baud is None or ident.baud > self.max_baud:
                self._finish(Failed("unsupported", f"mode B baud character {ident.baud_char!r} "
                                                   f"(max_baud {self.max_baud})"))
                return
            self.baud = ident.baud
            self._steps.append(SetBaud(ident.baud))
            return
        self.baud = min(ident.baud or 300, self.max_baud)
        ack = option_select(self.baud)
        self._steps.append(Send(ack, REACTION_S))
        if self.baud != 300:
            # after the option select has left the port, before the meter answers (its reaction time, >= 200 ms)
            self._steps.append(SetBaud(self.baud, _transmit_s(len(ack), 300) + 0.1))

    def _finish(self, end: Done | Failed) -> None:
        self._end = end
        self._steps.clear()


# -- a driver (asyncio; the only part of this module with I/O) ---------------------------------------------------


class DialoguePort(Protocol):
    baud: int  # the current rate (SetBaud to the same rate is skipped)

    def write(self, data: bytes) -> None: ...

    async def read(self, timeout: float | None = None) -> bytes: ...  # b"" when the timeout passed

    def set_baud(self, baud: int) -> None: ...


async def run_session(session: Iec62056Session, port: DialoguePort,
                      clock: Callable[[], float] = time.monotonic) -> list[Event]:
    """Drive `session` over `port` until Done or Failed; returns every event. The port's errors propagate."""
    events: list[Event] = []
    sent_at = clock()
    while True:
        step = session.next_step()
        if isinstance(step, Send):
            if step.delay_s > 0:
                await asyncio.sleep(step.delay_s)
            sent_at = clock()
            port.write(step.data)
        elif isinstance(step, SetBaud):
            wait = sent_at + step.delay_s - clock()
            if wait > 0:
                await asyncio.sleep(wait)
            if getattr(port, "baud", None) != step.baud:  # (re-setting the same rate fails on some ttys, e.g. ptys)
                port.set_baud(step.baud)
        elif isinstance(step, Expect):
            data = await port.read(step.timeout_s)
            events += session.feed(data) if data else session.timeout()
        else:
            return events


log = logging.getLogger("citynerve.serial")
_warn = RateLimitedLog(log, interval=300)


async def run_dialogue(source: Any, emit: Callable[[list], None]) -> None:
    """For a serial source (`source.device`, `source.stream`, `source.readings(events, now_ns)`, `source.stats`):
    one readout now, then one every `device.interval` seconds (aligned), forever. A failed readout is counted
    (`stats["iec62056.<reason>"]`) and logged; the next interval tries again."""
    from edge_agent.schedule import next_aligned

    device = source.device
    interval = float(device.interval)
    while True:
        session = Iec62056Session(device.address, device.max_baud)
        events = await run_session(session, source.stream)
        if source.stream.baud != 300:
            source.stream.set_baud(300)  # tidy; the next session starts with SetBaud(300) anyway
        readings = source.readings(events, time.time_ns())
        if readings:
            emit(readings)
        end = session.next_step()
        if isinstance(end, Failed):
            stats = getattr(source, "stats", None)
            if stats is not None:
                stats[f"iec62056.{end.reason}"] += 1
            _warn.warning(("iec62056", device.id, end.reason), "device %s: IEC 62056-21 readout failed: %s (%s)",
                          device.id, end.reason, end.detail, device=device.id, reason=end.reason)
        await asyncio.sleep(max(0.0, next_aligned(time.time(), interval) - time.time()))
