"""M-Bus application layer (EN 13757-3): the variable data structure of a RSP_UD, decoded into named fields in the
shared vocabulary's units. Pure: bytes in, a Telegram (header, records) or TelegramError (with the byte) out.

    CI 72H  long header: identification number (4 bytes BCD), manufacturer (2, three letters packed 5 bits each,
            EN 13757-3 §5.6), version, medium, access number, status, signature (2); then data records
    CI 7AH  short header: access number, status, signature (2); then data records
    CI 78H  no header

A data record (§6): DIF [DIFE ...] VIF [VIFE ...] data.
- DIF: bits 0-3 the data field (0 none, 1/2/3/4/6/7 signed integers of 1/2/3/4/6/8 bytes, 5 a 32-bit real,
  9/A/B/C/E BCD of 2/4/6/8/12 digits, D variable length, F special), bits 4-5 the function (instantaneous, maximum,
  minimum, value during error state), bit 6 the storage number's lowest bit, bit 7 a DIFE follows.
- DIFE: bits 0-3 four more storage number bits, bits 4-5 two tariff bits, bit 6 one subunit bit, bit 7 another.
- Special DIFs: 0FH manufacturer specific data to the end, 1FH the same and more records in the next telegram,
  2FH idle filler.
- VIF: the primary table (§8.4.3: energy, volume, mass, times, power, flows, temperatures, pressure, time point,
  fabrication number, ...); FDH and FBH select the extension tables (§8.4.4: voltage, current, error flags, versions,
  MWh, GJ, ...); 7CH/FCH plain text; 7FH/FFH manufacturer specific. VIFEs after a primary VIF (§8.4.5) may
  correct the value (multiplicative 10^(n-6), additive 10^(n-3)) or change its meaning (the record then keeps a
  name with the VIFE code, out of the vocabulary).
- Variable length (DIF xDH, LVAR): text (00H-BFH, sent last character first), BCD (C0H-DFH), binary numbers
  (E0H-F6H), EN 13757-3:2013 Table 5.
- Not decoded: CI 73H (the fixed data structure of EN 1434-3, a legacy format) is refused as "unsupported".
- BCD with F in its most significant digit is negative (§6.3 type A); other digits above 9 mean "no valid value"
  (meters send them in error states): such a field gets quality "error", never a number.

Field names (shared vocabulary): energy (kWh), volume (m³), mass (kg), power (W), flow (m³/h), mass_flow (kg/h),
temperature_supply, temperature_return, temperature_external (°C), temperature_difference (K), pressure (hPa),
on_time, operating_time, averaging_duration, actuality_duration (s), voltage (V), current (A), meter_time (text),
fabrication_number (text), error_flags, ... Suffixes in this order: _max, _min, _error (function), _s<n> (storage
number n > 0), _t<n> (tariff), _u<n> (subunit), _2, _3 for repeats within one telegram.
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass, field

CI_LONG = 0x72
CI_SHORT = 0x7A
CI_NONE = 0x78

MEDIA = {
    0x00: "other", 0x01: "oil", 0x02: "electricity", 0x03: "gas", 0x04: "heat (outlet)", 0x05: "steam",
    0x06: "hot water", 0x07: "water", 0x08: "heat cost allocator", 0x09: "compressed air",
    0x0A: "cooling (outlet)", 0x0B: "cooling (inlet)", 0x0C: "heat (inlet)", 0x0D: "heat / cooling", 0x0E: "bus",
    0x0F: "unknown", 0x15: "hot water (>= 90 °C)", 0x16: "cold water", 0x17: "dual water", 0x18: "pressure",
    0x19: "A/D converter",
}
# What measurement a meter's readings go to, by medium.
MEASUREMENT = {0x02: "electricity", 0x03: "gas", 0x04: "heat", 0x06: "water", 0x07: "water", 0x0A: "heat",
               0x0B: "heat", 0x0C: "heat", 0x0D: "heat", 0x15: "water", 0x16: "water", 0x17: "water"}

_FUNCTION = {0: "", 1: "_max", 2: "_min", 3: "_error"}
_LENGTH = {0x0: 0, 0x1: 1, 0x2: 2, 0x3: 3, 0x4: 4, 0x5: 4, 0x6: 6, 0x7: 8, 0x8: 0, 0x9: 1, 0xA: 2, 0xB: 3, 0xC: 4,
           0xE: 6}
_BCD = {0x9, 0xA, 0xB, 0xC, 0xE}
_TIME_UNITS = (1, 60, 3600, 86400)  # nn of the duration VIFs: seconds, minutes, hours, days


class TelegramError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class Header:
    ci: int
    identification: str = ""  # 8 digits
    manufacturer: str = ""  # 3 letters
    version: int = 0
    medium: int = 0x0F
    access_number: int = 0
    status: int = 0
    signature: int = 0

    @property
    def secondary_address(self) -> str:
        """The 16 hex digits a secondary address selection names this meter by."""
        code = _manufacturer_code(self.manufacturer)
        return f"{self.identification}{code:04X}{self.version:02X}{self.medium:02X}"


@dataclass
class Record:
    name: str
    value: float | int | str | None  # None: no valid value (quality error)
    unit: str
    offset: int  # of the DIF within the telegram's data (after CI)
    function: int = 0
    storage: int = 0
    tariff: int = 0
    subunit: int = 0
    description: str = ""


@dataclass
class Telegram:
    header: Header
    records: list[Record] = field(default_factory=list)
    more_follows: bool = False  # DIF 1FH: request the next telegram (FCB toggled)
    manufacturer_data: bytes = b""

    @property
    def measurement(self) -> str:
        return MEASUREMENT.get(self.header.medium, "meter")

    def fields(self) -> tuple[dict[str, float | int | str], dict[str, str], dict[str, str]]:
        """(fields, quality, units) of this telegram's records."""
        values: dict[str, float | int | str] = {}
        quality: dict[str, str] = {}
        units: dict[str, str] = {}
        for r in self.records:
            if r.value is None:
                quality[r.name] = "error"
            else:
                values[r.name] = r.value
            if r.unit:
                units[r.name] = r.unit
        return values, quality, units


def _manufacturer(raw: int) -> str:
    return "".join(chr(((raw >> shift) & 0x1F) + 64) for shift in (10, 5, 0))


def _manufacturer_code(text: str) -> int:
    if len(text) != 3:
        return 0xFFFF
    return ((ord(text[0]) - 64) << 10) | ((ord(text[1]) - 64) << 5) | (ord(text[2]) - 64)


def _bcd_text(raw: bytes) -> str:
    return "".join(f"{b:02X}" for b in reversed(raw))


def parse_header(ci: int, data: bytes) -> tuple[Header, int]:
    """The header and the offset of the first record."""
    if ci == CI_LONG:
        if len(data) < 12:
            raise TelegramError("short", f"a CI 72H header is 12 bytes, the telegram has {len(data)}")
        # 8 BCD digits by the standard; some meters put hex digits there (seen: 0500023E): kept as read, since
        # the secondary address selection matches the same nibbles
        ident = _bcd_text(data[0:4])
        return Header(ci, ident, _manufacturer(int.from_bytes(data[4:6], "little")), data[6], data[7], data[8],
                      data[9], int.from_bytes(data[10:12], "little")), 12
    if ci == CI_SHORT:
        if len(data) < 4:
            raise TelegramError("short", f"a CI 7AH header is 4 bytes, the telegram has {len(data)}")
        return Header(ci, access_number=data[0], status=data[1], signature=int.from_bytes(data[2:4], "little")), 4
    if ci == CI_NONE:
        return Header(ci), 0
    raise TelegramError("unsupported", f"CI {ci:02X}H (variable data responses are 72H, 7AH, 78H)")


# -- VIF tables -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantity:
    name: str
    unit: str
    factor: float  # raw value x factor = value in `unit`
    kind: str = "number"  # number | date | datetime | text | int


def _primary(vif: int) -> Quantity | None:
    """EN 13757-3 §8.4.3 (bit 7, the extension bit, already removed)."""
    n = vif & 0x07
    top = vif & 0x78
    if top == 0x00:
        return Quantity("energy", "kWh", 10.0 ** (n - 3) / 1000)  # 10^(n-3) Wh
    if top == 0x08:
        return Quantity("energy", "kWh", 10.0 ** n / 3.6e6)  # 10^n J
    if top == 0x10:
        return Quantity("volume", "m³", 10.0 ** (n - 6))
    if top == 0x18:
        return Quantity("mass", "kg", 10.0 ** (n - 3))
    if top == 0x28:
        return Quantity("power", "W", 10.0 ** (n - 3))
    if top == 0x30:
        return Quantity("power", "W", 10.0 ** n / 3600)  # 10^n J/h
    if top == 0x38:
        return Quantity("flow", "m³/h", 10.0 ** (n - 6))
    if top == 0x40:
        return Quantity("flow", "m³/h", 10.0 ** (n - 7) * 60)  # m³/min
    if top == 0x48:
        return Quantity("flow", "m³/h", 10.0 ** (n - 9) * 3600)  # m³/s
    if top == 0x50:
        return Quantity("mass_flow", "kg/h", 10.0 ** (n - 3))
    nn = vif & 0x03
    small = {0x20: ("on_time", "s"), 0x24: ("operating_time", "s"), 0x70: ("averaging_duration", "s"),
             0x74: ("actuality_duration", "s")}
    if vif & 0x7C in small:
        name, unit = small[vif & 0x7C]
        return Quantity(name, unit, float(_TIME_UNITS[nn]))
    temps = {0x58: "temperature_supply", 0x5C: "temperature_return", 0x64: "temperature_external"}
    if vif & 0x7C in temps:
        return Quantity(temps[vif & 0x7C], "°C", 10.0 ** (nn - 3))
    if vif & 0x7C == 0x60:
        return Quantity("temperature_difference", "K", 10.0 ** (nn - 3))
    if vif & 0x7C == 0x68:
        return Quantity("pressure", "hPa", 10.0 ** (nn - 3) * 1000)  # 10^(nn-3) bar
    if vif == 0x6C:
        return Quantity("meter_date", "", 1.0, "date")
    if vif == 0x6D:
        return Quantity("meter_time", "", 1.0, "datetime")
    if vif == 0x6E:
        return Quantity("hca_units", "", 1.0)  # units for heat cost allocators (dimensionless)
    if vif == 0x78:
        return Quantity("fabrication_number", "", 1.0, "text")
    if vif == 0x79:
        return Quantity("enhanced_identification", "", 1.0, "text")
    if vif == 0x7A:
        return Quantity("bus_address", "", 1.0, "int")
    return None


def _table_fd(vife: int) -> Quantity | None:
    """EN 13757-3 §8.4.4 table a (after VIF FDH), the entries meters use."""
    v = vife & 0x7F
    if v & 0x70 == 0x40:
        return Quantity("voltage", "V", 10.0 ** ((v & 0x0F) - 9))
    if v & 0x70 == 0x50:
        return Quantity("current", "A", 10.0 ** ((v & 0x0F) - 12))
    named = {0x08: ("access_number", "int"), 0x09: ("medium", "int"), 0x0A: ("manufacturer", "int"),
             0x0B: ("parameter_set", "text"), 0x0C: ("model_version", "text"), 0x0D: ("hardware_version", "text"),
             0x0E: ("firmware_version", "text"), 0x0F: ("software_version", "text"), 0x10: ("customer_location", "text"),
             0x11: ("customer", "text"), 0x17: ("error_flags", "int"),
             0x1A: ("digital_output", "int"), 0x1B: ("digital_input", "int"), 0x1C: ("baud_rate", "int"),
             0x60: ("reset_counter", "int"), 0x61: ("cumulation_counter", "int")}
    if v in named:
        name, kind = named[v]
        return Quantity(name, "", 1.0, kind)
    if v & 0x7C == 0x24:
        return Quantity("storage_interval", "s", float(_TIME_UNITS[v & 0x03]))
    if v & 0x7C == 0x2C:
        return Quantity("duration_since_readout", "s", float(_TIME_UNITS[v & 0x03]))
    return None


def _table_fb(vife: int) -> Quantity | None:
    """EN 13757-3 §8.4.4 table b (after VIF FBH), the large units."""
    v = vife & 0x7F
    n = v & 0x01
    if v & 0x7E == 0x00:
        return Quantity("energy", "kWh", 10.0 ** (n - 1) * 1000)  # 10^(n-1) MWh
    if v & 0x7E == 0x08:
        return Quantity("energy", "kWh", 10.0 ** (n - 1) * 1e6 / 3.6)  # 10^(n-1) GJ
    if v & 0x7E == 0x10:
        return Quantity("volume", "m³", 10.0 ** (n + 2))
    if v & 0x7E == 0x18:
        return Quantity("mass", "kg", 10.0 ** (n + 2) * 1000)  # t
    if v & 0x7E == 0x28:
        return Quantity("power", "W", 10.0 ** (n - 1) * 1e6)  # MW
    if v & 0x7E == 0x30:
        return Quantity("power", "W", 10.0 ** (n - 1) * 1e9 / 3600)  # GJ/h
    return None


# -- values ----------------------------------------------------------------------------------------------------


def _bcd_value(raw: bytes) -> int | None:
    """Type A (§6.3): BCD, low byte first; F in the top digit is a minus sign; other digits above 9: invalid."""
    text = _bcd_text(raw)
    negative = text[0] == "F"
    if negative:
        text = text[1:]
    if not text.isdigit():
        return None
    return -int(text) if negative else int(text)


def _date_g(raw: bytes) -> str | None:
    """Type G (§A.2): day 5 bits, month 4 bits, year 7 bits split over both bytes."""
    v = int.from_bytes(raw[:2], "little")
    day, month = v & 0x1F, (v >> 8) & 0x0F
    year = ((v >> 5) & 0x07) | ((v >> 9) & 0x78)
    try:
        return dt.date(2000 + year, month, day).isoformat()
    except ValueError:
        return None


def _datetime_f(raw: bytes) -> str | None:
    """Type F (§A.3): minute 6 bits (bit 7: invalid), hour 5, day 5, month 4, year 7."""
    v = int.from_bytes(raw[:4], "little")
    if v & 0x80:
        return None  # the meter marks the time invalid
    minute, hour = v & 0x3F, (v >> 8) & 0x1F
    day, month = (v >> 16) & 0x1F, (v >> 24) & 0x0F
    year = ((v >> 21) & 0x07) | ((v >> 25) & 0x78)
    try:
        return dt.datetime(2000 + year, month, day, hour, minute).strftime("%Y-%m-%dT%H:%M")
    except ValueError:
        return None


def _datetime_i(raw: bytes) -> str | None:
    """Type I (§A.?): second 6 bits, then type F's layout in the next four bytes (6 bytes with a day of week)."""
    second = raw[0] & 0x3F
    base = _datetime_f(raw[1:5])
    return None if base is None else f"{base}:{second:02d}"


def _raw_number(dfield: int, raw: bytes) -> int | float | None:
    if dfield in _BCD:
        return _bcd_value(raw)
    if dfield == 0x5:
        (value,) = struct.unpack("<f", raw)
        return value if value == value else None  # NaN: no value
    return int.from_bytes(raw, "little", signed=True)


def decode(ci: int, data: bytes) -> Telegram:
    """A RSP_UD's CI and data (after CI) as a Telegram. TelegramError names the record's byte offset."""
    header, pos = parse_header(ci, data)
    telegram = Telegram(header)
    seen: dict[str, int] = {}
    while pos < len(data):
        start = pos
        dif = data[pos]
        pos += 1
        if dif == 0x2F:
            continue  # idle filler
        if dif in (0x0F, 0x1F):
            telegram.more_follows = dif == 0x1F
            telegram.manufacturer_data = bytes(data[pos:])
            break
        if dif == 0x7F:
            raise TelegramError("unsupported", f"global readout request DIF 7FH at byte {start}")
        storage = (dif >> 6) & 0x01
        tariff = subunit = 0
        ext = dif & 0x80
        shift = 1
        n_dife = 0
        while ext:
            if pos >= len(data):
                raise TelegramError("short", f"record at byte {start}: the telegram ends inside its DIFEs")
            dife = data[pos]
            pos += 1
            n_dife += 1
            if n_dife > 10:
                raise TelegramError("malformed", f"record at byte {start}: more than 10 DIFEs")
            storage |= (dife & 0x0F) << shift
            tariff |= ((dife >> 4) & 0x03) << (2 * (n_dife - 1))
            subunit |= ((dife >> 6) & 0x01) << (n_dife - 1)
            shift += 4
            ext = dife & 0x80
        if pos >= len(data):
            raise TelegramError("short", f"record at byte {start}: no VIF")
        vif = data[pos]
        pos += 1
        vifes: list[int] = []
        plain_unit = ""
        if vif & 0x7F == 0x7C:  # plain text VIF: length, then ASCII (reversed)
            if pos >= len(data):
                raise TelegramError("short", f"record at byte {start}: plain text VIF without its length")
            n = data[pos]
            plain_unit = bytes(reversed(data[pos + 1:pos + 1 + n])).decode("ascii", "replace")
            pos += 1 + n
        ext = vif & 0x80
        while ext:
            if pos >= len(data):
                raise TelegramError("short", f"record at byte {start}: the telegram ends inside its VIFEs")
            vifes.append(data[pos])
            ext = data[pos] & 0x80
            pos += 1
            if len(vifes) > 10:
                raise TelegramError("malformed", f"record at byte {start}: more than 10 VIFEs")
        dfield = dif & 0x0F
        if dfield == 0xD:  # variable length: LVAR
            if pos >= len(data):
                raise TelegramError("short", f"record at byte {start}: no LVAR")
            lvar = data[pos]
            pos += 1
            if lvar <= 0xBF:
                size, var_kind = lvar, "text"
            elif lvar <= 0xDF:
                size, var_kind = (lvar & 0x0F), "bcd" if lvar < 0xD0 else "bcd-"
            elif lvar <= 0xEF:
                size, var_kind = lvar & 0x0F, "int"  # binary number of LVAR-E0H bytes
            elif lvar <= 0xF4:
                size, var_kind = 4 * (lvar - 0xEC), "int"  # binary number of 4 x (LVAR-ECH) bytes
            elif lvar in (0xF5, 0xF6):
                size, var_kind = 48 if lvar == 0xF5 else 64, "int"
            else:
                raise TelegramError("unsupported", f"record at byte {start}: LVAR {lvar:02X}H (reserved)")
        else:
            size, var_kind = _LENGTH.get(dfield, -1), ""
            if size < 0:
                raise TelegramError("unsupported", f"record at byte {start}: data field {dfield:X}H")
        if pos + size > len(data):
            raise TelegramError("short", f"record at byte {start}: {size} data bytes from byte {pos}, the telegram "
                                         f"ends at {len(data)}")
        raw = bytes(data[pos:pos + size])
        pos += size
        if dfield == 0x8:
            continue  # "selection for readout": no value
        if vif == 0xFD and vifes and vifes[0] & 0x7F == 0x16:
            continue  # a password (EN 13757-3 table 8.4.4 a, 16H): never a field anyone can read
        record = _record(start, dif, vif, vifes, dfield, var_kind, raw, plain_unit)
        record.function, record.storage, record.tariff, record.subunit = (dif >> 4) & 0x03, storage, tariff, subunit
        name = record.name + _FUNCTION[record.function]
        if storage:
            name += f"_s{storage}"
        if tariff:
            name += f"_t{tariff}"
        if subunit:
            name += f"_u{subunit}"
        seen[name] = seen.get(name, 0) + 1
        record.name = name if seen[name] == 1 else f"{name}_{seen[name]}"
        telegram.records.append(record)
    return telegram


def _record(start: int, dif: int, vif: int, vifes: list[int], dfield: int, var_kind: str, raw: bytes,
            plain_unit: str) -> Record:
    code = vif & 0x7F
    quantity: Quantity | None
    rest = vifes
    if vif == 0xFD and vifes:
        quantity, rest = _table_fd(vifes[0]), vifes[1:]
        code_name = f"fd{vifes[0] & 0x7F:02x}"
    elif vif == 0xFB and vifes:
        quantity, rest = _table_fb(vifes[0]), vifes[1:]
        code_name = f"fb{vifes[0] & 0x7F:02x}"
    elif code == 0x7C:
        quantity, code_name = Quantity(f"plain_{_slug(plain_unit)}", plain_unit, 1.0), "7c"
    elif code in (0x7E, 0x7F):
        quantity, code_name = None, f"{code:02x}"
    else:
        quantity, code_name = _primary(code), f"{code:02x}"
    if quantity is None:
        # manufacturer specific or a code outside the tables: kept under its codes, out of the vocabulary
        quantity = Quantity(f"vif_{code_name}", "", 1.0)
    factor = quantity.factor
    suffix = ""
    for i, vife in enumerate(rest):
        v = vife & 0x7F
        if v == 0x7F:
            # manufacturer specific: the VIFEs after it are the vendor's (often a phase or channel number)
            suffix += "_mfr" + "".join(f"{x & 0x7F:02x}" for x in rest[i + 1:])
            break
        if 0x70 <= v <= 0x77:
            factor *= 10.0 ** ((v & 0x07) - 6)  # multiplicative correction factor (§8.4.5)
        elif v == 0x7D:
            factor *= 1000.0
        elif 0x78 <= v <= 0x7B:
            continue  # additive correction: applied below is not possible without the value order; rare, noted
        elif v == 0x3B:
            suffix += "_positive"  # accumulation of positive contributions only
        elif v == 0x3C:
            suffix += "_negative"
        elif v <= 0x0F:
            suffix += "_record_error"  # the VIFE reports a record error code
        else:
            suffix += f"_x{v:02x}"  # a meaning the vocabulary has no name for: kept, visibly out of it
    value: float | int | str | None
    if quantity.kind == "date":
        value = _date_g(raw) if len(raw) == 2 else None
    elif quantity.kind == "datetime":
        value = _datetime_f(raw) if len(raw) == 4 else (_datetime_i(raw) if len(raw) == 6 else None)
    elif var_kind == "text":
        value = bytes(reversed(raw)).decode("latin-1").strip()
    elif quantity.kind == "text":
        number = _raw_number(dfield, raw) if raw else None
        value = (_bcd_text(raw) if dfield in _BCD and number is not None else
                 (str(number) if number is not None else None))
    else:
        if var_kind in ("bcd", "bcd-"):
            number = _bcd_value(raw)
            if number is not None and var_kind == "bcd-":
                number = -number
        elif var_kind == "int":
            number = int.from_bytes(raw, "little", signed=True)
        elif not raw:
            number = None
        else:
            number = _raw_number(dfield, raw)
        if number is None:
            value = None
        elif quantity.kind == "int":
            value = int(number)
        else:
            # always a float: a field's type is fixed in the store whatever the meter's data field
            value = round(float(number) * factor, 9)
    return Record(quantity.name + suffix, value, quantity.unit, start)


def _slug(text: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "_" for c in text).strip("_")
    return out or "unit"
