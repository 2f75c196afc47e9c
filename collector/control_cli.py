"""edge-collector config push|history|diff|status, command ..., poll-now: the operator's side of the control plane.

The CLI signs with the operator's own key (never the collector's: it has none that a gateway accepts) and records
the signed document in the control store; the running collector relays it (collector/control_relay.py). Before
storing, it checks the document exactly as a gateway's wire.control.Trust would (CA signature, revocation, validity,
role, scope, deadline): a document every gateway would refuse is refused here, with the same reason code. The
gateway checks again itself; nothing here is trusted by it.

What the CLI cannot check, the gateway does and reports: whether a configuration passes `edge-agent check` on the
gateway (its profiles, serial ports and key files are there, not here: the report carries the one error line,
reason invalid_config), and whether a point is writable, in range or critical (its profile is on the gateway).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from wire import control
from wire.cli import fail
from wire.config import ConfigError, Duration

DEFAULT_CONFIG = "/etc/citynerve/collector.toml"
OPERATOR_ENV = "CITYNERVE_OPERATOR"
COMMANDS = ("config", "command", "poll-now")
EXIT_NOT_DONE = 1


class CliError(Exception):
    """A user's mistake or a refusal: one line on stderr."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# -- parser -----------------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, operator: bool = False) -> None:
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help="collector.toml with a [control] section (default %(default)s)")
    if operator:
        p.add_argument("--operator", metavar="KEYFILE",
                       help=f"your operator key (<name>.key; <name>.cert next to it); default: ${OPERATOR_ENV}")


def register_subcommands(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser("config", help="remote configuration: push, history, diff, status")
    csub = config.add_subparsers(dest="config_action", required=True, metavar="ACTION")
    p = csub.add_parser("push", help="sign a new desired configuration for a gateway (or a group) and store it")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("file", metavar="FILE", help="the whole agent.toml the gateway is to run")
    p.add_argument("--group", nargs="+", default=[], metavar="GW",
                   help="more gateways: each gets the file with its own [gateway] id")
    p.add_argument("--confirm-timeout", default="2m", metavar="DURATION",
                   help="the gateway rolls back unless its uplink works again within this (default %(default)s)")
    p.add_argument("--deadline", default="7d", metavar="DURATION",
                   help="not applied after this long (default %(default)s, at most 30d)")
    _common(p, operator=True)
    p = csub.add_parser("history", help="the versions pushed to a gateway, with their state on it")
    p.add_argument("gateway", metavar="GW")
    _common(p)
    p = csub.add_parser("diff", help="unified diff of two versions' TOML (default: the newest and the one before)")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("versions", nargs="*", type=int, metavar="V")
    _common(p)
    p = csub.add_parser("status", help="desired against running configuration, per gateway")
    p.add_argument("gateway", nargs="?", metavar="GW")
    p.add_argument("--json", action="store_true")
    _common(p)

    p = sub.add_parser("command", help="GW DEVICE POINT=VALUE | GW DEVICE --poll-now | approve ID | list | show ID",
                       description="Send a signed command to a device: `command GW DEVICE POINT=VALUE`; "
                                   "`command GW DEVICE --poll-now`; `command approve ID` (a second operator for a "
                                   "critical point); `command list [--pending]`; `command show ID`.")
    p.add_argument("words", nargs="+", metavar="ARG")
    p.add_argument("--deadline", default="5m", metavar="DURATION",
                   help="not run after this long (default %(default)s, at most 24h)")
    p.add_argument("--wait", nargs="?", const="", default=None, metavar="TIMEOUT",
                   help="wait for the gateway's final report (default: until the deadline); exit 1 unless done")
    p.add_argument("--poll-now", action="store_true", help="poll the device at once instead of writing")
    p.add_argument("--critical", action="store_true",
                   help="the point is critical: store the command until a second operator approves it")
    p.add_argument("--pending", action="store_true", help="list: only commands awaiting approval")
    p.add_argument("--gateway", help="list: only this gateway's")
    p.add_argument("--limit", type=int, default=50, help="list: at most this many (default %(default)s)")
    _common(p, operator=True)
    p = sub.add_parser("poll-now", help="poll a device at once (a signed poll_now command)")
    p.add_argument("gateway", metavar="GW")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--deadline", default="5m", metavar="DURATION")
    p.add_argument("--wait", nargs="?", const="", default=None, metavar="TIMEOUT")
    _common(p, operator=True)


def dispatch(args: argparse.Namespace) -> int | None:
    if args.command not in COMMANDS:
        return None
    try:
        ctx = _Context(args)
        try:
            if args.command == "config":
                return _config(ctx, args)
            if args.command == "poll-now":
                return _send_command(ctx, args, args.gateway, args.device, None)
            return _command(ctx, args)
        finally:
            ctx.close()
    except CliError as exc:
        return fail(str(exc), exc.code)
    except ConfigError as exc:
        return fail(str(exc))


# -- context: collector.toml, the store, the operator --------------------------------------------------------


class _Context:
    def __init__(self, args: argparse.Namespace) -> None:
        from collector import config as collector_config
        from collector.control_store import ControlStore

        self.config_path = args.config
        cfg = collector_config.load(args.config)
        if cfg.control is None:
            raise CliError(f"{args.config}: no [control] section: the collector relays no commands or "
                           "configurations (docs/control.md)")
        self.control = cfg.control
        self.store = ControlStore(cfg.control.store)
        self._operator_arg = getattr(args, "operator", None)

    def close(self) -> None:
        self.store.close()

    def operator(self) -> tuple[Any, control.SignedCert, control.OperatorCert]:
        keyfile = self._operator_arg or os.environ.get(OPERATOR_ENV)
        if not keyfile:
            raise CliError(f"who signs? give --operator KEYFILE or set {OPERATOR_ENV} (edge-collector operators add)")
        key = load_operator_key(keyfile)
        cert_path = Path(keyfile).with_suffix(".cert")
        signed_cert = load_operator_cert(cert_path)
        cert = control.read_cert(signed_cert)
        if cert.key != key.public_key().public_bytes_raw():
            raise CliError(f"{keyfile}: not the key of the certificate {cert_path} (operator {cert.name!r})")
        return key, signed_cert, cert

    def trust(self) -> control.Trust:
        """What a gateway trusts, as far as this machine knows: the operator CA and the current list."""
        from collector.control_relay import CrlFile

        ca = load_ca_public(self.control.operator_ca)
        crl = CrlFile(self.control.crl)
        crl.refresh()
        if crl.signed is None:
            raise CliError(f"{self.control.crl}: no operator revocation list ({crl.error or 'missing'}): every "
                           "gateway would refuse with no_crl (run: edge-collector operators crl)")
        return control.Trust(ca, control.encode(crl.signed))

    def check(self, signed: control.SignedDoc, gateway: str, required: int = 1) -> None:
        """Refuse early what every gateway would refuse (the same check, the same reason codes)."""
        try:
            self.trust().verify(signed, gateway=gateway, now_ms=_now_ms(), required=required)
        except control.ControlRefused as exc:
            raise CliError(f"refused: {exc.reason}: {exc.detail} (every gateway would refuse it; nothing stored)") \
                from None


def load_operator_key(path: str) -> Any:
    from wire.keys import identity_from_pem

    try:
        return identity_from_pem(Path(path).read_bytes())
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise CliError(f"{path}: not an operator's Ed25519 private key in PEM ({exc})") from None


def load_operator_cert(path: Path) -> control.SignedCert:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{path}: {getattr(exc, 'strerror', None) or exc} (the operator certificate is expected "
                       "next to the key, <name>.cert)") from None
    try:
        return control.decode_signed_cert(control.unarmour("OPERATOR CERTIFICATE", text))
    except (ValueError, control.ControlRefused) as exc:
        raise CliError(f"{path}: {exc}") from None


def load_ca_public(path: str) -> Any:
    from wire.keys import public_identity_from_file

    try:
        return public_identity_from_file(path)
    except ValueError as exc:
        raise CliError(f"{exc} (control.operator_ca: the operator CA's public key)") from None


# -- config ----------------------------------------------------------------------------------------------------


def _config(ctx: _Context, args: argparse.Namespace) -> int:
    action = args.config_action
    if action == "push":
        return _push(ctx, args)
    if action == "history":
        rows = ctx.store.config_history(args.gateway)
        if not rows:
            raise CliError(f"no configuration pushed to {args.gateway}", 1)
        print(f"{'version':>7}  {'pushed':<20} {'state':<12} {'sha256':<12}  operators  last report")
        for r in rows:
            print(f"{r.version:>7}  {_iso(r.created_ms):<20} {r.state:<12} {r.sha256[:12]}  {r.operators:<10} "
                  f"{_why(r.reason, r.detail)}")
        return 0
    if action == "diff":
        return _diff(ctx, args)
    return _status(ctx, args)


def _push(ctx: _Context, args: argparse.Namespace) -> int:
    confirm = _duration(args.confirm_timeout, "--confirm-timeout")
    deadline = _duration(args.deadline, "--deadline")
    path = Path(args.file)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from None
    if len(raw) > control.MAX_DOCUMENT_BYTES // 2:
        raise CliError(f"{path}: {len(raw)} bytes, more than a configuration may have "
                       f"({control.MAX_DOCUMENT_BYTES // 2})")
    try:
        text = raw.decode("utf-8")
        tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: not UTF-8 (byte offset {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"{path}: not valid TOML: {exc}") from None
    key, signed_cert, _ = ctx.operator()
    targets = [args.gateway, *[g for g in args.group if g != args.gateway]]
    issued = _now_ms()
    prepared = []
    for gateway in targets:
        body = gateway_text(text, gateway, allow_rewrite=bool(args.group), source=str(path))
        _protected_keys_kept(ctx, gateway, body, str(path))
        version = ctx.store.next_config_version(gateway)
        doc = control.ConfigDoc(gateway, version, body, control.config_sha256(body), issued,
                                issued + int(deadline * 1000), confirm)
        signed = control.sign("config", doc, key, signed_cert)
        ctx.check(signed, gateway)
        prepared.append((doc, signed))
    from collector.control_store import StoreError

    for doc, signed in prepared:
        try:
            ctx.store.add_config(doc, signed, _now_ms())
        except StoreError as exc:
            raise CliError(str(exc), 1) from None
        print(f"{doc.gateway}: version {doc.version} (sha256 {doc.sha256[:12]}) stored; the collector sends it and "
              f"shows its progress in: edge-collector config status {doc.gateway}")
    return 0


_GATEWAY_TABLE = re.compile(r"^\s*\[\s*gateway\s*\]\s*(#.*)?$")
_TABLE = re.compile(r"^\s*\[")
_ID_LINE = re.compile(r"^(\s*id\s*=\s*)(\"[^\"]*\"|'[^']*')(.*)$")


def gateway_text(text: str, gateway: str, *, allow_rewrite: bool, source: str) -> str:
    """The configuration for one gateway: its own `[gateway] id` (a push may not change it, the gateway refuses
    protected_key). For a group push the id line is replaced by each gateway's; every other byte is the same."""
    current = tomllib.loads(text).get("gateway", {}).get("id")
    if current == gateway:
        return text
    if not allow_rewrite:
        raise CliError(f"{source}: gateway.id: is {current!r}, pushing to {gateway!r} (a pushed configuration may "
                       "not change gateway.id; with --group each gateway gets its own id)")
    lines = text.splitlines(keepends=True)
    in_gateway = False
    for i, line in enumerate(lines):
        if _TABLE.match(line):
            in_gateway = bool(_GATEWAY_TABLE.match(line.rstrip("\r\n")))
            continue
        m = _ID_LINE.match(line.rstrip("\r\n"))
        if in_gateway and m:
            ending = line[len(line.rstrip("\r\n")):]
            lines[i] = f'{m.group(1)}"{gateway}"{m.group(3)}{ending}'
            out = "".join(lines)
            if tomllib.loads(out).get("gateway", {}).get("id") == gateway:
                return out
    raise CliError(f"{source}: gateway.id: cannot set it to {gateway!r} for a group push (write it as "
                   "id = \"...\" on its own line under [gateway])")


def _protected_keys_kept(ctx: _Context, gateway: str, text: str, source: str) -> None:
    """What a push may not change, against the last version pushed (the gateway checks against what it runs)."""
    history = ctx.store.config_history(gateway)
    if not history:
        return
    new, old = tomllib.loads(text), tomllib.loads(history[-1].toml)
    for key, (a, b) in {"gateway.state_dir": (new.get("gateway", {}).get("state_dir"),
                                              old.get("gateway", {}).get("state_dir")),
                        "security": (new.get("security"), old.get("security"))}.items():
        if a != b:
            raise CliError(f"{source}: {key}: differs from version {history[-1].version} of {gateway}; a pushed "
                           f"configuration may not change it (the gateway refuses: {control.ControlReason.PROTECTED_KEY})")


def _diff(ctx: _Context, args: argparse.Namespace) -> int:
    history = {r.version: r for r in ctx.store.config_history(args.gateway)}
    if not history:
        raise CliError(f"no configuration pushed to {args.gateway}", 1)
    if len(args.versions) > 2:
        raise CliError("config diff GW [V1 [V2]]: at most two versions")
    newest = max(history)
    v2 = args.versions[1] if len(args.versions) == 2 else newest
    v1 = args.versions[0] if args.versions else v2 - 1
    for v in (v1, v2):
        if v not in history:
            raise CliError(f"{args.gateway} has no version {v} (versions {min(history)}..{newest})", 1)
    sys.stdout.writelines(difflib.unified_diff(
        history[v1].toml.splitlines(keepends=True), history[v2].toml.splitlines(keepends=True),
        f"{args.gateway} version {v1}", f"{args.gateway} version {v2}"))
    return 0


def _status(ctx: _Context, args: argparse.Namespace) -> int:
    rows = ctx.store.config_status(args.gateway)
    docs = []
    for s in rows:
        d, r = s.desired, s.running
        docs.append({
            "gateway": s.gateway, "in_sync": s.in_sync,
            "desired": None if d is None else {"version": d.version, "sha256": d.sha256, "state": d.state,
                                               "reason": d.reason, "detail": d.detail, "pushed": _iso(d.created_ms),
                                               "updated": _iso(d.updated_ms), "operators": d.operators,
                                               "sends": d.sends},
            "running": None if r is None else {"version": r.version, "sha256": r.sha256, "seen": _iso(r.at_ms),
                                               "source": r.source},
        })
    if args.json:
        print(json.dumps(docs, indent=2))
        return 0
    if not docs:
        print("no gateway has a pushed configuration or has reported one")
        return 0
    print(f"{'gateway':<20} {'desired':>7} {'state':<12} {'running':>7} {'sync':<4}  last report")
    for doc in docs:
        d, r = doc["desired"], doc["running"]
        print(f"{doc['gateway']:<20} {d['version'] if d else '-':>7} {d['state'] if d else '-':<12} "
              f"{r['version'] if r else '?':>7} {'yes' if doc['in_sync'] else 'no':<4}  "
              f"{_why(d['reason'], d['detail']) if d else ''}")
    return 0


# -- commands --------------------------------------------------------------------------------------------------


def _command(ctx: _Context, args: argparse.Namespace) -> int:
    words = args.words
    if words[0] == "approve":
        if len(words) != 2:
            raise CliError("command approve ID")
        return _approve(ctx, words[1])
    if words[0] == "list":
        return _list(ctx, args)
    if words[0] == "show":
        if len(words) != 2:
            raise CliError("command show ID")
        return _show(ctx, words[1])
    if args.poll_now:
        if len(words) != 2:
            raise CliError("command GW DEVICE --poll-now")
        return _send_command(ctx, args, words[0], words[1], None)
    if len(words) != 3 or "=" not in words[2]:
        raise CliError("command GW DEVICE POINT=VALUE (or GW DEVICE --poll-now, approve ID, list, show ID)")
    point, _, value = words[2].partition("=")
    return _send_command(ctx, args, words[0], words[1], (point.strip(), parse_value(value.strip())))


def parse_value(text: str) -> bool | int | float:
    """true/false, an integer, or a number: what a point's value may be (wire.control.Value)."""
    low = text.lower()
    if low in ("true", "on"):
        return True
    if low in ("false", "off"):
        return False
    try:
        return int(text, 10)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise CliError(f"value {text!r}: expected a number, true or false") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise CliError(f"value {text!r}: expected a finite number")
    return value


def _send_command(ctx: _Context, args: argparse.Namespace, gateway: str, device: str,
                  write: tuple[str, bool | int | float] | None) -> int:
    deadline = _duration(args.deadline, "--deadline")
    key, signed_cert, _ = ctx.operator()
    issued = _now_ms()
    cmd = control.Command(control.new_command_id(), gateway, device, "write" if write else "poll_now", issued,
                          issued + int(deadline * 1000), write[0] if write else None, write[1] if write else None)
    signed = control.sign("command", cmd, key, signed_cert)
    ctx.check(signed, gateway)  # also what msgspec refuses to carry (a gateway id, device or point name): malformed
    needed = 2 if getattr(args, "critical", False) else 1
    state = ctx.store.add_command(cmd, signed, needed, _now_ms())
    print(f"command {cmd.id}: {state}" + (" (a second operator runs: edge-collector command approve "
                                          f"{cmd.id})" if state == "awaiting_approval" else ""))
    if args.wait is None or state == "awaiting_approval":
        return 0
    return _wait(ctx, cmd.id, args.wait, cmd.deadline_ms)


def _approve(ctx: _Context, command_id: str) -> int:
    from collector.control_store import StoreError

    row = ctx.store.command(command_id)
    if row is None:
        raise CliError(f"no command {command_id}", 1)
    if row.state != "awaiting_approval":
        raise CliError(f"command {command_id} is {row.state}, not awaiting approval", 1)
    key, signed_cert, cert = ctx.operator()
    signed = control.decode_signed_doc(row.signed)
    if any(control.read_cert(a.cert).name == cert.name for a in signed.approvals):
        raise CliError(f"{cert.name} already signed command {command_id}: a second, different operator approves")
    signed = control.cosign(signed, key, signed_cert)
    ctx.check(signed, row.gateway, required=min(len(signed.approvals), row.approvals_needed))
    try:
        state = ctx.store.approve_command(command_id, signed, _now_ms())
    except StoreError as exc:
        raise CliError(str(exc), 1) from None
    print(f"command {command_id}: approved by {cert.name}, {state}")
    return 0


def _wait(ctx: _Context, command_id: str, timeout_text: str, deadline_ms: int) -> int:
    timeout = (_duration(timeout_text, "--wait") if timeout_text
               else max(0.0, (deadline_ms - _now_ms()) / 1000) + 30)  # the deadline, and time for a last report
    end = time.monotonic() + timeout
    while True:
        row = ctx.store.command(command_id)
        assert row is not None
        if row.final:
            print(describe_result(row))
            return 0 if row.state == "done" else EXIT_NOT_DONE
        if time.monotonic() >= end:
            print(f"{row.state}: no final report after {timeout:g}s (edge-collector command show {command_id})")
            return EXIT_NOT_DONE
        time.sleep(0.2)


def describe_result(row: Any) -> str:
    if row.state == "done":
        if row.action == "poll_now":
            return "done: polled"
        return f"done: {row.point} = {_value(row.readback)}"
    if row.state == "expired":
        return "expired" + (f" ({row.detail})" if row.detail else "")
    return f"{row.state}: {_why(row.reason, row.detail)}"


def _list(ctx: _Context, args: argparse.Namespace) -> int:
    rows = ctx.store.commands(gateway=args.gateway, states=("awaiting_approval",) if args.pending else (),
                              limit=args.limit)
    for r in rows:
        target = f"{r.gateway}/{r.device}" + (f"/{r.point}={_value(r.value)}" if r.action == "write" else " poll-now")
        print(f"{r.id}  {_iso(r.created_ms)}  {r.state:<17} {target:<40} {r.operators}")
    return 0


def _show(ctx: _Context, command_id: str) -> int:
    r = ctx.store.command(command_id)
    if r is None:
        raise CliError(f"no command {command_id}", 1)
    print(f"command {r.id}\n  target     {r.gateway}/{r.device}" + (f"/{r.point} = {_value(r.value)}"
                                                                       if r.action == "write" else " (poll now)"))
    print(f"  operators  {r.operators} ({len(control.decode_signed_doc(r.signed).approvals)} of "
          f"{r.approvals_needed} approvals)")
    print(f"  created    {_iso(r.created_ms)}, deadline {_iso(r.deadline_ms)}")
    print(f"  state      {r.state}" + (f", sent {r.sends} time(s), last {_iso(r.sent_ms)}" if r.sends else ""))
    if r.final:
        print(f"  result     {describe_result(r)}")
    return 0


# -- helpers ---------------------------------------------------------------------------------------------------


def _duration(text: str, option: str) -> float:
    try:
        value = float(text) if re.fullmatch(r"\d+(\.\d+)?", text) else float(Duration.parse(text))
    except (ValueError, TypeError) as exc:
        raise CliError(f"{option}: {exc}") from None
    if value <= 0:
        raise CliError(f"{option}: expected a duration > 0, got {text!r}")
    return value


def _why(reason: str, detail: str) -> str:
    if not reason:
        return detail
    return f"{reason} ({detail})" if detail else reason


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _iso(ms: int) -> str:
    import datetime as dt

    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
