"""What a valid name is: the one character rule for device ids, measurements, tag keys and values, field keys
and quality flags, shared by the wire schema (wire/schema.py: decode_batch, and ConfigName / ConfigTagValue for
configuration and profile files), the line-protocol encoder (collector/influx/lineproto.py) and the health lines
(collector/health.py). Pure, no I/O.

A name may hold any Unicode character except

- the C0 controls U+0000-U+001F and DEL U+007F: a newline splits a line of line protocol, a log line or a CSV
  row; an escape sequence rewrites a technician's terminal;
- the C1 controls U+0080-U+009F: U+0085 (NEL) is a line break to Python's str.splitlines() and to Unicode-aware
  readers, the others are terminal control sequences (U+009B is CSI) - and they are what a name decoded from
  Latin-1 or Windows-1252 bytes by mistake is full of;
- lone surrogates U+D800-U+DFFF: they cannot be encoded as UTF-8, so such a name can be neither sent, stored
  nor logged.

Before this module the schema refused only C0 and DEL while the encoder also refused C1: a reading whose device
id held U+0085 passed the schema and was acknowledged, and then could never be stored.

Lengths (1..128 for names, up to 256 for tag values) stay with the schema's types; the line-protocol encoder
adds rules of its own that are about line protocol, not about names (where a backslash may stand, a measurement
starting with "#", the key "time").
"""

from __future__ import annotations

import re

__all__ = ["BAD_CHARACTER", "NAME_PATTERN", "TAG_VALUE_PATTERN", "bad_character", "describe"]

# The refused characters as the inside of a regular expression class (escapes, so this file holds none of them).
BAD_CHARACTERS = r"\x00-\x1f\x7f-\x9f\ud800-\udfff"
BAD_CHARACTER = re.compile(f"[{BAD_CHARACTERS}]")
# For msgspec.Meta(pattern=...), whose errors then carry the key path: a name (non-empty) and a tag value (may
# be empty: a tag without a value is left out). \Z, not $: "$" also matches before a final newline.
NAME_PATTERN = f"^[^{BAD_CHARACTERS}]+\\Z"
TAG_VALUE_PATTERN = f"^[^{BAD_CHARACTERS}]*\\Z"


def bad_character(name: str) -> str | None:
    """The first character of `name` a name must not hold, or None when there is none."""
    if name.isprintable():
        # The common case at C speed, several times faster than the search: controls and surrogates are
        # Unicode category "Other", never printable. A name that is not printable may still be fine (U+00A0,
        # U+2028 and U+FEFF are allowed): the search decides.
        return None
    found = BAD_CHARACTER.search(name)
    return found.group() if found else None


def describe(char: str) -> str:
    """A refused character for an error message: its code point, which a terminal cannot garble."""
    code = ord(char)
    if 0xD800 <= code <= 0xDFFF:
        return f"lone surrogate U+{code:04X} (not encodable as UTF-8)"
    return f"control character U+{code:04X}"
