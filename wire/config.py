"""Load a TOML file into typed msgspec Structs; every error names the file, the key path and what was expected.

Both programs (and the firmware-profile loader) validate through `load(path, Struct)`, so a technician sees
one error style everywhere:

    agent.toml: devices[2].port: expected an integer 1..65535, got "abc"

Conventions for config Structs:
- declare `forbid_unknown_fields=True` so a typo is an error, not a silently ignored key;
- durations are `Duration` (accepts 10, 2.5, "10s", "500ms", "5m", "1h");
- sizes are `Size` (accepts 1000000, "200MB", "64KiB");
- secrets are `Secret` (accepts "inline", {env = "NAME"} or {file = "/path"}), masked in repr and never quoted
  in an error; a URL or a text from elsewhere goes into a message through `redact_url` / `redact`;
- cross-field checks go in `__post_init__` and raise `invalid("key", "message")` so the path is exact.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgspec

T = TypeVar("T")


class ConfigError(Exception):
    """A user's mistake in a file: printed as one line, never as a traceback."""

    def __init__(self, source: str, path: str, message: str) -> None:
        self.source = source
        self.path = path
        self.message = message
        where = f"{source}: {path}: " if path else f"{source}: "
        super().__init__(where + message)


class Duration(float):
    """Seconds, written in a file as a number of seconds or a string such as "10s", "250ms", "5m"."""

    _UNITS: ClassVar[dict[str, float]] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    _PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")

    @classmethod
    def parse(cls, value: object) -> Duration:
        if isinstance(value, bool):
            raise ValueError(f'expected a duration such as "10s" or "500ms", got {_show(value)}')
        if isinstance(value, int | float):
            if value < 0 or not math.isfinite(value):
                raise ValueError(f"expected a duration of 0 or more seconds, got {_show(value)}")
            return cls(value)
        if isinstance(value, str):
            match = cls._PATTERN.match(value)
            if match:
                return cls(float(match.group(1)) * cls._UNITS[match.group(2)])
        raise ValueError(f'expected a duration such as "10s", "500ms" or "5m", got {_show(value)}')

    def __repr__(self) -> str:
        return f"Duration({float(self)}s)"


class Size(int):
    """Bytes, written in a file as a number or a string such as "200MB", "64KiB", "1GB"."""

    _UNITS: ClassVar[dict[str, int]] = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10,
                                        "mib": 2**20, "gib": 2**30}
    _PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)

    @classmethod
    def parse(cls, value: object) -> Size:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return cls(value)
        if isinstance(value, str):
            match = cls._PATTERN.match(value)
            if match and match.group(2).lower() in cls._UNITS:
                return cls(int(float(match.group(1)) * cls._UNITS[match.group(2).lower()]))
        raise ValueError(f'expected a size such as "200MB", "512KiB" or a number of bytes, got {_show(value)}')


class Secret:
    """A password or token: inline, from an environment variable or from a file (first line, stripped).

    The value is resolved while the file is loaded, so a missing variable is a start-up error naming the key.
    """

    __slots__ = ("origin", "value")

    def __init__(self, value: str, origin: str = "inline") -> None:
        self.value = value
        self.origin = origin

    @classmethod
    def parse(cls, raw: object) -> Secret:
        if isinstance(raw, str):
            return cls(raw)
        if isinstance(raw, dict) and len(raw) == 1:
            (kind, ref), = raw.items()
            if kind == "env" and isinstance(ref, str):
                if ref not in os.environ:
                    raise ValueError(f"environment variable {ref} is not set")
                return cls(os.environ[ref], f"env:{ref}")
            if kind == "file" and isinstance(ref, str):
                try:
                    text = Path(ref).read_text(encoding="utf-8")
                except OSError as exc:
                    raise ValueError(f"cannot read secret file {ref}: {exc.strerror or exc}") from None
                lines = text.splitlines()
                return cls(lines[0].strip() if lines else "", f"file:{ref}")
        # The kind of value only, never the value: a password written as a bare number is still a password.
        raise ValueError('expected a string, {env = "NAME"} or {file = "/path"}, got ' + _kind(raw))

    def __repr__(self) -> str:
        return f"Secret(<{self.origin}>)"

    def __bool__(self) -> bool:
        return bool(self.value)


REDACTED = "***"

# A URL anywhere in a text: scheme://, then up to whitespace or a quote.
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")


def redact_url(url: str) -> str:
    """`url` fit for a message or a log line: credentials and query values replaced by ***.

    http://user:pass@host:8086/x?u=a&p=b#frag -> http://user:***@host:8086/x?u=***&p=***#***
    A user name alone (http://TOKEN@host) may be a token: the whole user part goes. Query values all go,
    since InfluxDB (u=, p=, token=) and other servers take credentials there.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo = None
    if "@" in rest:
        # Up to the last "@", not what urlsplit calls the user part: a password with an unescaped "/", "?" or
        # "#" would otherwise be cut in two and half of it printed as the path or the fragment.
        userinfo, rest = rest.rsplit("@", 1)
    try:
        parts = urlsplit(f"{scheme}://{rest}")
    except ValueError:  # e.g. a broken IPv6 literal: keep only what cannot hold a secret
        parts = urlsplit(f"{scheme}://{re.split(r'[/?#]', rest, maxsplit=1)[0].replace('[', '').replace(']', '')}")
    netloc = parts.netloc
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        keep_user = colon and re.fullmatch(r"[^/?#]+", user)
        netloc = f"{user}:{REDACTED}@{netloc}" if keep_user else f"{REDACTED}@{netloc}"
    query = "&".join(
        f"{name}={REDACTED}" if has_value else REDACTED
        for pair in parts.query.split("&") if pair
        for name, has_value, _ in [pair.partition("=")]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, REDACTED if parts.fragment else ""))


def redact(text: str, *secrets: Secret | str | None) -> str:
    """`text` with every URL in it passed through redact_url and every given secret value replaced by ***.

    For messages that quote something we did not write (a server's reply, a library's exception).
    """
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    for secret in secrets:
        value = secret.value if isinstance(secret, Secret) else secret
        if value:
            text = text.replace(value, REDACTED)
    return text


def invalid(key: str, message: str) -> ValueError:
    """An error for `__post_init__` that points at one key of the Struct being checked."""
    return ValueError(f"@{key}@{message}")


def check_client_tls(settings: Any) -> None:
    """For `__post_init__` of a client's connection settings with `tls`, `ca_file`, `cert_file` and `key_file`: a
    certificate needs its key, each file named must be readable, and files need tls on."""
    cert, key = settings.cert_file, settings.key_file
    if (cert is None) != (key is None):
        raise invalid("key_file" if key is None else "cert_file",
                      "cert_file and key_file go together (a client certificate needs its key)")
    check_readable(settings, "ca_file", "cert_file", "key_file")
    if (cert or settings.ca_file) and not settings.tls:
        raise invalid("tls", "certificates are configured but tls = false")


def check_readable(settings: object, *keys: str) -> None:
    """For `__post_init__`: each of `keys` of `settings` that names a file (None: not set) must be readable by
    this user, or the error points at that key."""
    for key in keys:
        path = getattr(settings, key)
        if path is not None and not os.access(path, os.R_OK):
            reason = "does not exist" if not os.path.exists(path) else "is not readable by this user"
            raise invalid(key, f"{path} {reason}")


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Duration:
        return Duration.parse(obj)
    if type_ is Secret:
        return Secret.parse(obj)
    if type_ is Size:
        return Size.parse(obj)
    raise NotImplementedError(f"no config decoder for {type_!r}")


def read_toml(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except IsADirectoryError:
        raise ConfigError(str(path), "", "is a directory, expected a TOML file") from None
    except PermissionError:
        raise ConfigError(str(path), "", "permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), "", f"not UTF-8 text at byte offset {exc.start}") from None


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """TOML text that did not come from a file of its own (a pushed configuration); `source` names it in errors."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"not valid TOML: {exc}") from None


def load(path: Path | str, schema: type[T]) -> T:
    return convert(read_toml(path), schema, str(path))


def convert(raw: Any, schema: type[T], source: str) -> T:
    try:
        return msgspec.convert(raw, schema, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        path, message = explain(str(exc), raw, schema)
        raise ConfigError(source, path, message) from None


# --- turning msgspec's messages into a technician's --------------------------------------------------------

_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.S)
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _split_path(path: str) -> list[str | int]:
    return [name if name else int(index) for name, index in _PATH_PART.findall(path)]


def _join_path(parts: list[str | int]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def explain(error: str, raw: Any, schema: type) -> tuple[str, str]:
    match = _AT.match(error)
    message, parts = (match["msg"], _split_path(match["path"])) if match else (error, [])
    info = _pick_tagged(_type_at(msgspec.inspect.type_info(schema), parts, raw), _value_at(raw, parts)[1])

    if message.startswith("@"):  # raised by invalid(key, ...) in a __post_init__
        key, _, text = message[1:].partition("@")
        return _join_path([*parts, key]), text
    unknown = re.match(r"Object contains unknown field `(.+)`", message)
    if unknown:
        name = unknown.group(1)
        known = [f.encode_name for f in getattr(_unwrap(info), "fields", ())]  # an optional table too
        hint = difflib.get_close_matches(name, known, n=1)
        suffix = f' (did you mean "{hint[0]}"?)' if hint else f" (known keys: {', '.join(known)})"
        return _join_path([*parts, name]), f"unknown key{suffix}"
    missing = re.match(r"Object missing required field `(.+)`", message)
    if missing:
        field = missing.group(1)
        field_info = _type_at(info, [field], _value_at(raw, parts)[1])
        return _join_path([*parts, field]), f"required key is missing: expected {_describe(field_info)}"
    if message.startswith("Invalid value") and parts:
        kinds = _tags_of(_type_at(msgspec.inspect.type_info(schema), parts[:-1], raw))
        if kinds:
            found, value = _value_at(raw, parts)
            return _join_path(parts), f"expected one of {', '.join(map(_show, kinds))}, got {_show(value)}"
    if message.startswith(("Expected", "Invalid enum value")):
        found, value = _value_at(raw, parts)
        got = f", got {_show(value)}" if found else ""
        return _join_path(parts), f"expected {_describe(info)}{got}"
    return _join_path(parts), message


def _type_at(info: Any, parts: list[str | int], raw: Any = None) -> Any:
    for part in parts:
        info = _pick_tagged(_unwrap(info), raw)
        raw = raw.get(part) if isinstance(raw, dict) else (
            raw[part] if isinstance(raw, list) and isinstance(part, int) and part < len(raw) else None)
        if isinstance(info, msgspec.inspect.StructType):
            info = next((f.type for f in info.fields if f.encode_name == part), None)
        elif isinstance(info, msgspec.inspect.ListType | msgspec.inspect.TupleType):
            info = getattr(info, "item_type", None)
        elif isinstance(info, msgspec.inspect.DictType):
            info = info.value_type
        else:
            return None
    return info


def _pick_tagged(info: Any, raw: Any) -> Any:
    """The member of a tagged union that the raw table's tag value selects (e.g. devices[i].kind)."""
    if isinstance(info, msgspec.inspect.UnionType) and isinstance(raw, dict):
        for option in info.types:
            if isinstance(option, msgspec.inspect.StructType) and option.tag_field is not None \
                    and raw.get(option.tag_field) == option.tag:
                return option
    return info


def _tags_of(info: Any) -> list[Any]:
    """The tag values a tagged Struct (or union of them) accepts, e.g. device kinds."""
    options = info.types if isinstance(info, msgspec.inspect.UnionType) else [info]
    return [o.tag for o in options if isinstance(o, msgspec.inspect.StructType) and o.tag is not None]


def _unwrap(info: Any) -> Any:
    while True:
        if isinstance(info, msgspec.inspect.Metadata):
            info = info.type
        elif isinstance(info, msgspec.inspect.UnionType):
            options = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
            if len(options) != 1:
                return info
            info = options[0]
        else:
            return info


def _describe(info: Any) -> str:
    if isinstance(info, msgspec.inspect.UnionType):  # an optional key: describe what it takes when given
        options = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(options) == 1:
            return _describe(options[0])
    if isinstance(info, msgspec.inspect.Metadata) and info.extra and "expect" in info.extra:
        return info.extra["expect"]
    info = _unwrap(info)
    t = msgspec.inspect
    if isinstance(info, t.IntType):
        lo = info.ge if info.ge is not None else (info.gt + 1 if info.gt is not None else None)
        hi = info.le if info.le is not None else (info.lt - 1 if info.lt is not None else None)
        if lo is not None and hi is not None:
            return f"an integer {lo}..{hi}"
        if lo is not None:
            return f"an integer >= {lo}"
        return "an integer"
    if isinstance(info, t.FloatType):
        lo = info.ge if info.ge is not None else info.gt
        hi = info.le if info.le is not None else info.lt
        if lo is not None and hi is not None:
            return f"a number {lo:g}..{hi:g}"
        return f"a number >= {lo}" if lo is not None else "a number"
    if isinstance(info, t.BoolType):
        return "true or false"
    if isinstance(info, t.StrType):
        if info.pattern:
            return f"a string matching {info.pattern}"
        return "a non-empty string" if info.min_length else "a string"
    if isinstance(info, t.LiteralType):
        return "one of " + ", ".join(_show(v) for v in info.values)
    if isinstance(info, t.EnumType):
        return "one of " + ", ".join(_show(m.value) for m in info.cls)
    if isinstance(info, t.ListType):
        item = _unwrap(info.item_type)
        return "a list of tables" if isinstance(item, t.StructType) else f"a list of {_describe(item)}"
    if isinstance(info, t.DictType):
        return "a table"
    if isinstance(info, t.StructType):
        return "a table"
    if isinstance(info, t.CustomType):
        if info.cls is Duration:
            return 'a duration such as "10s"'
        if info.cls is Size:
            return 'a size such as "200MB"'
        if info.cls is Secret:
            return 'a string, {env = "NAME"} or {file = "/path"}'
    if isinstance(info, t.UnionType):
        return " or ".join(_describe(x) for x in info.types)
    return "a different value"


def _value_at(raw: Any, parts: list[str | int]) -> tuple[bool, Any]:
    for part in parts:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, raw


def _kind(value: Any) -> str:
    """What a value is, without the value: for secrets."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return "a date or time" if hasattr(value, "isoformat") else "another kind of value"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)
