"""The collector's audit log: an append-only file of JSON lines whose entries are hash-chained.

    {"seq":1,"time":"2025-01-01T12:00:00.123Z", ...content..., "prev":"000...0","hash":"<sha256 hex>"}

`hash` is SHA-256 over the entry's canonical JSON without `hash` (keys sorted, no spaces, ASCII escapes:
`canonical()`), `prev` is the previous entry's `hash` (64 zeros for the first). Changing any entry changes
its hash, so it no longer matches its content, or - if the attacker recomputed it - no longer matches the next
entry's `prev`. The head (last seq and hash) is also kept in `<log>.head`, written after each append, so that
removing the *last* entries is detected too (the log would end before its head).

What this does not stop, said plainly (docs/security.md "Audit"): someone who can rewrite the log *and* its
head file (root or the collector's user on the collector host) can write a whole new, consistent chain. Only
a copy of the head kept elsewhere detects that: `edge-collector audit head` prints it for an external record,
and `audit verify --anchor SEQ:HASH` checks the log against such a record.

Blocking (fsync): the running collector calls `append` on its control thread, never on the event loop.
Several writers on one machine are safe: an append holds an exclusive flock on `<log>.lock` (and a reader a
shared one, so that log and head are read as one state).
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from wire.files import flocked, private_file, write_private

GENESIS = "0" * 64  # the `prev` of the first entry
RESERVED = ("seq", "time", "prev", "hash")  # the chain's own keys; an entry's content may not use them
MAX_LINE = 4 * 1024 * 1024  # bytes per entry: a configuration is at most 1 MiB (wire.control.MAX_DOCUMENT_BYTES)
_TAIL_CHUNK = 64 * 1024


class AuditError(Exception):
    """An append refused (the log does not end at its head, an entry that is not JSON): one line, naming the file."""


def canonical(entry: dict[str, Any]) -> bytes:
    """The bytes hashed and written: sorted keys, no whitespace, non-ASCII escaped, no NaN or Infinity."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A JSON object with a key twice shows one value to one reader and another to the next (most keep the last):
    # an entry must mean one thing.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_line(raw: bytes) -> dict[str, Any]:
    """One entry from its line (without the newline); ValueError says why it is not one."""
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                           parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise ValueError(f"bad JSON: not UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"bad JSON: {exc.msg} at column {exc.colno}") from None
    except ValueError as exc:
        raise ValueError(f"bad JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("bad JSON: not an object")
    for key in RESERVED:
        if key not in value:
            raise ValueError(f"not an audit entry: no {key!r}")
    if not isinstance(value["seq"], int) or isinstance(value["seq"], bool) or value["seq"] < 1:
        raise ValueError(f"not an audit entry: seq {value['seq']!r}")
    for key in ("prev", "hash"):
        if not isinstance(value[key], str) or len(value[key]) != 64:
            raise ValueError(f"not an audit entry: {key} {value[key]!r}")
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_anchor(text: str) -> tuple[int, str]:
    """SEQ:HASH as `audit head` prints it."""
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or int(seq) < 1 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"anchor {text!r}: expected SEQ:HASH as `edge-collector audit head` prints it")
    return int(seq), digest


def _iso_ms(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class AuditLog:
    """`<path>` (the entries), `<path>.head` (the last seq and hash), `<path>.lock` (the writers' lock)."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._clock = clock

    # -- writing -----------------------------------------------------------------------------------------------

    def append(self, entry: dict[str, Any]) -> str:
        """Append one entry (its content: operator(s), action, target, value, result, times) and return its hash.
        Durable when it returns: the line is fsynced before the head is written. Raises AuditError."""
        clash = [k for k in RESERVED if k in entry]
        if clash:
            raise AuditError(f"{self.path}: an audit entry's content may not use the key(s) {', '.join(clash)}")
        with flocked(self.lock_path):
            fd = os.open(private_file(self.path), os.O_RDWR | os.O_APPEND)
            try:
                seq, prev = self._tail_for_append(fd)
                full = {**entry, "seq": seq + 1, "time": _iso_ms(self._clock()), "prev": prev}
                try:
                    full["hash"] = entry_hash(full)
                    line = canonical(full) + b"\n"
                except (TypeError, ValueError) as exc:
                    raise AuditError(f"{self.path}: the entry is not JSON: {exc}") from None
                if len(line) > MAX_LINE:
                    raise AuditError(f"{self.path}: an entry of {len(line)} bytes (at most {MAX_LINE})")
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            self._write_head(full["seq"], full["hash"])
        return str(full["hash"])

    def _tail_for_append(self, fd: int) -> tuple[int, str]:
        """(seq, hash) of the last entry, checked against the head. A torn last line (an append interrupted
        before its newline, hence before its head) is cut off, but only if what remains ends at the head."""
        head = self.head()
        size = os.fstat(fd).st_size
        last, end = self._last_line(fd, size)
        if last is None:
            if head is not None:
                raise AuditError(f"{self.path} has no entry but {self.head_path.name} says seq {head[0]}: the log "
                                 "was truncated or replaced (edge-collector audit verify)")
            if size > MAX_LINE:
                raise AuditError(f"{self.path}: no complete entry in {size} bytes: not an audit log (move it aside)")
            if size:
                os.ftruncate(fd, 0)  # the very first append was interrupted before its newline
            return 0, GENESIS
        try:
            entry = parse_line(last)
        except ValueError as exc:
            raise AuditError(f"{self.path}: the last entry is damaged ({exc}); edge-collector audit verify") from None
        seq, digest = entry["seq"], entry["hash"]
        if entry_hash(entry) != digest:
            raise AuditError(f"{self.path}: the last entry (seq {seq}) was altered; edge-collector audit verify")
        if head is None:
            raise AuditError(f"{self.path} has entries but {self.head_path.name} is missing: refusing to continue a "
                             f"chain whose end cannot be checked (edge-collector audit verify; docs/control.md#audit)")
        if (seq, digest) != head and not (seq == head[0] + 1 and entry["prev"] == head[1]):
            raise AuditError(f"{self.path} ends at seq {seq} but {self.head_path.name} says seq {head[0]}: entries "
                             "were removed or altered (edge-collector audit verify)")
        if end < size:  # a torn fragment after the last complete line, never covered by the head
            os.ftruncate(fd, end)
        return seq, digest

    @staticmethod
    def _last_line(fd: int, size: int) -> tuple[bytes | None, int]:
        """The last complete line (without its newline) and the offset just after it; (None, 0) if the file
        holds no newline. Reads backwards, at most about MAX_LINE bytes past the last newline."""
        pos, buf, end = size, b"", None
        while pos > 0:
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            buf = os.pread(fd, step, pos) + buf
            if end is None:
                nl = buf.rfind(b"\n")
                if nl < 0:
                    if len(buf) > MAX_LINE + _TAIL_CHUNK:
                        break  # no entry ends within the longest entry's length of the end
                    continue
                end, buf = pos + nl + 1, buf[:nl]
            start = buf.rfind(b"\n")
            if start >= 0:
                return buf[start + 1:], end
            if len(buf) > MAX_LINE:
                return buf, end  # too long to be an entry: parse_line says it is damaged
        return (buf, end) if end is not None else (None, 0)

    def _write_head(self, seq: int, digest: str) -> None:
        write_private(self.head_path, canonical({"seq": seq, "hash": digest}) + b"\n")

    # -- reading -----------------------------------------------------------------------------------------------

    def head(self) -> tuple[int, str] | None:
        """(seq, hash) from the head file; None if there is none. Raises AuditError if it is damaged."""
        try:
            raw = self.head_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
            seq, digest = doc["seq"], doc["hash"]
            if not isinstance(seq, int) or not isinstance(digest, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise AuditError(f"{self.head_path}: not an audit head (expected {{\"seq\": N, \"hash\": \"...\"}})") \
                from None
        return seq, digest

    def _lines(self) -> Iterator[tuple[int, bytes, bool]]:
        """(line number, bytes without the newline, complete) for every line of the log."""
        with open(self.path, "rb") as fh:
            for number, raw in enumerate(iter(lambda: fh.readline(MAX_LINE + 1), b""), start=1):
                complete = raw.endswith(b"\n")
                yield number, raw[:-1] if complete else raw, complete

    def entries(self, *, gateway: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """The entries in log order (oldest first), optionally of one gateway, at most the last `limit`.
        Lines that are not entries are skipped (verify() names them)."""
        out: collections.deque[dict[str, Any]] = collections.deque(maxlen=limit)
        if not self.path.exists():
            return []
        with flocked(self.lock_path, shared=True):
            for _, raw, complete in self._lines():
                if not complete:
                    continue
                try:
                    entry = parse_line(raw)
                except ValueError:
                    continue
                if gateway is None or entry.get("gateway") == gateway:
                    out.append(entry)
        return list(out)

    def verify(self, anchors: dict[int, str] | None = None) -> list[str]:
        """Every problem found, each naming the line (and seq) and what is wrong: altered, removed, reordered,
        truncated, bad JSON, a head that does not match. [] if the chain is intact. `anchors`: seq -> hash
        recorded elsewhere (`audit head`), which the log must still hold."""
        if not self.path.exists():
            return [f"{self.path}: no such file"]
        with flocked(self.lock_path, shared=True):
            try:
                head = self.head()
                head_problem = None
            except AuditError as exc:
                head, head_problem = None, str(exc)
            parsed: list[tuple[int, dict[str, Any]]] = []
            problems: list[str] = []
            for number, raw, complete in self._lines():
                if len(raw) > MAX_LINE:
                    problems.append(f"line {number}: longer than {MAX_LINE} bytes: not an entry")
                    continue
                if not complete:
                    problems.append(f"line {number}: incomplete (no newline at the end): truncated, or an append "
                                    "interrupted")
                    continue
                try:
                    entry = parse_line(raw)
                except ValueError as exc:
                    problems.append(f"line {number}: {exc}")
                    continue
                if entry_hash(entry) != entry["hash"]:
                    problems.append(f"line {number} (seq {entry['seq']}): altered: its hash does not match its content")
                parsed.append((number, entry))
        problems += _chain_problems(parsed)
        last = parsed[-1][1] if parsed else None
        if head_problem:
            problems.append(head_problem)
        elif head is None:
            if last is not None:
                problems.append(f"{self.head_path.name} is missing: the end of the log cannot be checked (removed "
                                "last entries would not be seen)")
        else:
            problems += _head_problems(head, self.head_path.name, parsed)
        for seq, digest in sorted((anchors or {}).items()):
            found = [e for _, e in parsed if e["seq"] == seq]
            if not found:
                problems.append(f"anchor seq {seq}: no such entry in the log (removed, or the log was replaced)")
            elif found[0]["hash"] != digest:
                problems.append(f"anchor seq {seq}: the log's entry has hash {found[0]['hash'][:16]}..., the anchor "
                                f"{digest[:16]}...: the log was rewritten")
        return problems


def _chain_problems(parsed: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """What the order of seqs and the prev links say: removed, reordered, duplicated, replaced entries."""
    problems: list[str] = []
    where = collections.defaultdict(list)
    for number, entry in parsed:
        where[entry["seq"]].append(number)
    previous: tuple[int, dict[str, Any]] | None = None
    for number, entry in parsed:
        seq = entry["seq"]
        if previous is None:
            if seq != 1:
                problems.append(_gap(1, seq, where, f"before line {number}"))
            elif entry["prev"] != GENESIS:
                problems.append(f"line {number} (seq 1): prev is not the chain's start: an entry was put before it")
        else:
            p_number, p_entry = previous
            p_seq = p_entry["seq"]
            if seq == p_seq + 1:
                if entry["prev"] != p_entry["hash"]:
                    problems.append(f"line {number} (seq {seq}): prev is not the hash of seq {p_seq} (line {p_number}):"
                                    f" seq {p_seq} was altered and its hash recomputed, or replaced")
            elif seq <= p_seq:
                kind = "duplicated" if len(where[seq]) > 1 else "reordered"
                problems.append(f"line {number} (seq {seq}): after seq {p_seq} (line {p_number}): {kind}")
            else:
                problems.append(_gap(p_seq + 1, seq, where, f"between line {p_number} and line {number}"))
        previous = (number, entry)
    return problems


def _gap(first: int, stop: int, where: dict[int, list[int]], place: str) -> str:
    """Seqs first..stop-1 are missing here: removed, or found elsewhere in the file (reordered)."""
    missing = [s for s in range(first, stop) if s not in where]
    moved = [s for s in range(first, stop) if s in where]
    parts = []
    if missing:
        span = f"seq {missing[0]}" if len(missing) == 1 else f"seq {missing[0]}..{missing[-1]} ({len(missing)} entries)"
        parts.append(f"{span} removed")
    if moved:
        parts.append(f"seq {', '.join(map(str, moved[:5]))}{' ...' if len(moved) > 5 else ''} out of order "
                     f"(reordered: found at line {where[moved[0]][0]})")
    return f"{place}: {'; '.join(parts)}"


def _head_problems(head: tuple[int, str], name: str, parsed: list[tuple[int, dict[str, Any]]]) -> list[str]:
    seq, digest = head
    if not parsed:
        return [f"the log has no entries but {name} says seq {seq}: every entry was removed"]
    last = parsed[-1][1]
    if last["seq"] < seq:
        n = seq - last["seq"]
        return [f"the log ends at seq {last['seq']} but {name} says seq {seq}: the last "
                f"{'entry was' if n == 1 else f'{n} entries were'} removed"]
    at_head = [e for _, e in parsed if e["seq"] == seq]
    if not at_head or at_head[0]["hash"] != digest:
        return [f"seq {seq} is not the entry {name} names (hash {digest[:16]}...): it was replaced"]
    if last["seq"] > seq + 1 or (last["seq"] == seq + 1 and last["prev"] != digest):
        return [f"the log goes on to seq {last['seq']} after the head (seq {seq}): entries were added without "
                "the head (not by an append)"]
    # last == head + 1 with prev == head's hash: an append interrupted between its line and its head; the next
    # append completes it.
    return []


# --- command line (wired into collector/cli.py) ---------------------------------------------------------------

COMMAND = "audit"


def register_subcommands(sub: Any) -> None:
    audit = sub.add_parser("audit", help="the hash-chained audit log of commands and configurations")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    def source(p: Any) -> None:
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("-c", "--config", metavar="FILE", help="collector.toml ([control] audit_log)")
        where.add_argument("--log", metavar="FILE", help="the audit log itself")

    p = audit_sub.add_parser("verify", help="check the chain: exit 0 if intact, 1 with every problem otherwise")
    source(p)
    p.add_argument("--anchor", action="append", default=[], metavar="SEQ:HASH",
                   help="a head recorded elsewhere (audit head) that the log must still hold; repeatable")
    p = audit_sub.add_parser("show", help="entries, oldest first")
    source(p)
    p.add_argument("--gateway", metavar="GW", help="only this gateway's entries")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="the last N (default %(default)s; 0: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per line, as stored")
    p = audit_sub.add_parser("head", help="print the head (SEQ:HASH) to record elsewhere (audit verify --anchor)")
    source(p)


def dispatch(args: Any) -> int | None:
    """Run `audit ...` and return its exit code; None for any other command."""
    if args.command != COMMAND:
        return None
    from wire.cli import fail

    path = _log_path(args)
    if isinstance(path, int):
        return path
    log = AuditLog(path)
    try:
        if args.audit_command == "verify":
            try:
                anchors = dict(parse_anchor(a) for a in args.anchor)
            except ValueError as exc:
                return fail(str(exc))
            if not log.path.exists():
                return fail(f"{path}: no such file", 1)
            problems = log.verify(anchors)
            if problems:
                for problem in problems:
                    print(f"{path}: {problem}", file=sys.stderr)
                return fail(f"{path}: {len(problems)} problem(s): the chain is not intact", 1)
            head, last = log.head(), log.entries(limit=1)
            print(f"{path}: {last[0]['seq'] if last else 0} entries, chain intact"
                  + (f" (head {head[0]}:{head[1]})" if head else "")
                  + (f", {len(anchors)} anchor(s) found" if anchors else ""))
            return 0
        if args.audit_command == "head":
            head = log.head()
            if head is None:
                return fail(f"{log.head_path}: no head (no entry appended yet)", 1)
            print(f"{head[0]}:{head[1]}")
            return 0
        if args.limit < 0:
            return fail(f"--limit must be >= 0, got {args.limit}")
        for entry in log.entries(gateway=args.gateway, limit=args.limit or None):
            print(canonical(entry).decode("ascii") if args.json else _describe(entry))
        return 0
    except AuditError as exc:
        return fail(str(exc), 1)
    except OSError as exc:
        return fail(f"{exc.filename or path}: {exc.strerror or exc}", 1)


def _log_path(args: Any) -> str | int:
    if args.log:
        return str(args.log)
    from collector import config as collector_config
    from wire.cli import fail
    from wire.config import ConfigError

    try:
        cfg = collector_config.load(args.config)
    except ConfigError as exc:
        return fail(str(exc))
    control = getattr(cfg, "control", None)
    if control is None or not getattr(control, "audit_log", ""):
        return fail(f"{args.config}: no [control] audit_log: give the log with --log FILE")
    return str(control.audit_log)


def _describe(entry: dict[str, Any]) -> str:
    rest = "  ".join(f"{k}={json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v}"
                     for k, v in sorted(entry.items()) if k not in RESERVED)
    return f"{entry['seq']:>6}  {entry['time']}  {rest}"
