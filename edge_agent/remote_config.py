"""Remote configuration on the gateway, commit confirmed: the shell around edge_agent/confirm.py.

docs/control.md "Remote configuration". A configuration document that the control dispatcher has verified
(operator signatures, role, scope, gateway, deadline: wire.control.Trust.verify) comes to `on_config`. From
there: replay and busy rules (confirm.Confirmer) -> checked exactly as `edge-agent check` (the one error line
goes back in the report) -> keys a push may not change refused (edge_agent/reconfig.py FIXED_KEYS) -> written
atomically as `<state_dir>/config/pending.toml` -> applied live (edge_agent/app.py `Agent.reconfigure`) ->
confirmed by a fresh end-to-end acknowledgement within the document's confirm timeout (the file becomes
`confirmed.toml`), or rolled back (the configuration that ran before is applied again).

Files, in `<state_dir>/config/` (all private, written atomically and fsynced through wire/files.py):
    state.json      {"floor": N, "trying": V|null}: the highest version run or tried (no replay below it), and the
                    version whose trial had begun (found at start: the trial was interrupted)
    pending.toml    the configuration being tried
    confirmed.toml  the last confirmed configuration; what the agent runs at start instead of its local file
Both .toml files begin with a comment line naming their version and the sha256 of the text that follows the
header, so each is self-describing (a pending file renamed into place is confirmed in one atomic step) and
`edge-agent check` reads them as they are.

SIGHUP (and `reload()`) goes through the same path: what the agent would run at start (the confirmed remote
configuration, or the local file after `edge-agent config reset`) is loaded, checked and applied live; an
invalid file is refused with its error line logged, and the running configuration is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import config as agent_config
from edge_agent.confirm import Accept, Confirmer, Queued, Refuse, Repeat, Saved, at_start
from edge_agent.reconfig import ReconfigureFailed, fixed_change
from wire.config import ConfigError
from wire.control import ConfigDoc, ControlReason, OperatorCert, Report, config_sha256
from wire.files import fsync_dir, private_dir, write_private

if TYPE_CHECKING:
    from edge_agent.app import Agent
    from edge_agent.config import AgentConfig

log = logging.getLogger("citynerve.agent.config")

# Why a trial was rolled back (Report.reason of state "rolled_back"; the detail says more).
ROLLED_BACK_NO_ACK = "no_ack"  # no fresh end-to-end acknowledgement within the confirm timeout
ROLLED_BACK_INTERRUPTED = "interrupted"  # the agent stopped (crash, kill -9, power cut) during the trial
ROLLED_BACK_APPLY_FAILED = "apply_failed"  # the live apply itself failed

MAX_INBOX = 8  # documents received and not yet looked at (each is handled in milliseconds unless applied)
MAX_FINALS = 16  # final reports kept to answer a redelivery of their version with the same report

_HEADER = re.compile(r"\A# citynerve remote configuration version (\d+) sha256 ([0-9a-f]{64})\n# [^\n]*\n")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the files --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredConfig:
    version: int
    sha256: str
    text: str  # the configuration as pushed, without the header
    path: Path


class ConfigStore:
    """`<state_dir>/config/`. Blocking file calls: the agent runs them on its "config" thread."""

    def __init__(self, state_dir: Path | str) -> None:
        self.dir = Path(state_dir) / "config"
        self.state_path = self.dir / "state.json"
        self.pending_path = self.dir / "pending.toml"
        self.confirmed_path = self.dir / "confirmed.toml"

    # reading

    def read_state(self) -> tuple[int, int | None]:
        """(floor, trying). A damaged state file gives (0, None) and a warning: replay protection then rests on
        the confirmed file's version, the next push still has to exceed it."""
        try:
            doc = json.loads(self.state_path.read_text(encoding="utf-8"))
            floor, trying = int(doc.get("floor", 0)), doc.get("trying")
            return floor, None if trying is None else int(trying)
        except FileNotFoundError:
            return 0, None
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("%s: unreadable (%s); starting from the confirmed configuration's version", self.state_path,
                        exc)
            return 0, None

    def read_confirmed(self) -> tuple[StoredConfig | None, str]:
        """The confirmed configuration, or None and why not ("" if there is none)."""
        return self._read(self.confirmed_path)

    def _read(self, path: Path) -> tuple[StoredConfig | None, str]:
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, ""
        except (OSError, UnicodeDecodeError) as exc:
            return None, f"{path}: unreadable ({exc})"
        m = _HEADER.match(raw)
        if m is None:
            return None, f"{path}: no header line naming its version and hash (edited by hand?)"
        text = raw[m.end():]
        if config_sha256(text) != m.group(2):
            return None, f"{path}: its content does not match the sha256 in its header (damaged or edited)"
        return StoredConfig(int(m.group(1)), m.group(2), text, path), ""

    def saved(self) -> tuple[Saved, StoredConfig | None, str]:
        floor, trying = self.read_state()
        confirmed, problem = self.read_confirmed()
        floor = max(floor, confirmed.version if confirmed else 0)
        return (Saved(floor, trying, confirmed.version if confirmed else None, self.pending_path.exists()),
                confirmed, problem)

    # writing (each step atomic and durable: wire/files.py write_private fsyncs the file and the directory)

    def _write_state(self, floor: int, trying: int | None) -> None:
        private_dir(self.dir)
        write_private(self.state_path, json.dumps({"floor": floor, "trying": trying}).encode() + b"\n")

    def begin(self, version: int, sha256: str, text: str, approved_by: str) -> None:
        """The floor first (a crash from here on can never let this version, or an older one, in again), then
        the pending file."""
        self._write_state(version, version)
        header = (f"# citynerve remote configuration version {version} sha256 {sha256}\n"
                  f"# approved by {approved_by}; written by the agent, do not edit (edge-agent config reset goes "
                  f"back to the local file)\n")
        write_private(self.pending_path, (header + text).encode("utf-8"))

    def confirm(self, version: int) -> None:
        """pending.toml becomes confirmed.toml in one rename; then the trial is over in the state file."""
        os.replace(self.pending_path, self.confirmed_path)
        fsync_dir(self.dir)
        self._write_state(version, None)

    def drop_pending(self, floor: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pending_path)
        fsync_dir(self.dir)
        self._write_state(floor, None)

    def reset(self) -> tuple[int | None, int]:
        """Forget the confirmed (and any pending) configuration: the local file runs from the next start or
        SIGHUP. The floor stays (an old version still cannot be replayed). Returns (confirmed version, floor)."""
        saved, confirmed, _ = self.saved()
        for path in (self.confirmed_path, self.pending_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if self.dir.exists():
            fsync_dir(self.dir)
            self._write_state(saved.floor, None)
        return (confirmed.version if confirmed else None), saved.floor


# --- start-up ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Running:
    """What the agent runs: the configuration, its version (0: the local file) and sha256, and where it came
    from (for log lines and the "running" report)."""

    cfg: AgentConfig
    version: int
    sha256: str
    origin: str


@dataclass(frozen=True)
class Start:
    running: Running
    floor: int
    interrupted: int | None  # a trial found interrupted: reported rolled back once the link is up


def local_running(local_path: Path | str) -> Running:
    """The local file as the running configuration (raises ConfigError like `edge-agent check`)."""
    path = Path(local_path)
    cfg = agent_config.load(path)
    try:
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(str(path), "", f"unreadable ({exc.strerror or exc})") from None
    return Running(cfg, 0, sha, f"the local file {path}")


def what_to_run(local_path: Path | str, local: Running | None = None) -> Start:
    """What the agent runs at start (and after SIGHUP): the last confirmed remote configuration if there is a
    usable one, else the local file. A trial found begun is dropped (the gateway was killed in the middle of
    it) and reported rolled back, reason "interrupted". Blocking (files): before the loop, or on a thread."""
    local = local or local_running(local_path)
    store = ConfigStore(local.cfg.gateway.state_dir)
    saved, confirmed, problem = store.saved()
    decision = at_start(saved)
    if decision.interrupted is not None:
        log.warning("configuration version %d was being tried when the agent stopped: dropped, reported rolled "
                    "back (interrupted)", decision.interrupted)
    if decision.remove_pending or decision.clear_trying:
        store.drop_pending(saved.floor)
    if problem:
        log.error("remote configuration not used: %s; running %s", problem, local.origin)
    running = local
    if decision.run_confirmed and confirmed is not None:
        try:
            cfg = agent_config.load_text(confirmed.text, str(confirmed.path), Path(local_path).resolve().parent)
        except ConfigError as exc:
            log.error("remote configuration version %d not used, it no longer passes the check: %s; running %s",
                      confirmed.version, exc, local.origin)
        else:
            key = fixed_change(local.cfg, cfg)
            if key is not None:
                log.error("remote configuration version %d not used: the local file %s changed %s since (a key a "
                          "push may not change, so the local file decides); running the local file", confirmed.version,
                          local_path, key)
            else:
                running = Running(cfg, confirmed.version, confirmed.sha256,
                                  f"remote configuration version {confirmed.version} ({confirmed.path})")
                log.info("running remote configuration version %d (sha256 %s, %s); the local file %s is ignored "
                         "(`edge-agent config reset %s` goes back to it)", confirmed.version, confirmed.sha256[:12],
                         confirmed.path, local_path, local_path)
    return Start(running, saved.floor, decision.interrupted)


# --- the shell --------------------------------------------------------------------------------------------------


def config_report(state: str, version: int, running: Running | None = None, *, reason: str = "",
                  detail: str = "") -> Report:
    kwargs: dict[str, Any] = {}
    if running is not None:
        kwargs = {"config_version": running.version, "config_sha256": running.sha256}
    return Report(kind="config", id=str(version), state=state, at_ms=now_ms(), reason=reason[:64],  # type: ignore[arg-type]
                  detail=detail[:2048], **kwargs)


class RemoteConfig:
    """Owns the agent's running configuration's identity (version, hash) and every change of it: pushed
    documents (`on_config`), SIGHUP (`reload`), the confirmation (`acked`, fed by the agent) and the rollback
    (its task `run`, under the agent's supervisor)."""

    def __init__(self, agent: Agent, local_path: Path | str, start: Start) -> None:
        self.agent = agent
        self.local_path = Path(local_path)
        self.store = ConfigStore(start.running.cfg.gateway.state_dir)
        self.running = start.running
        self.confirmer: Confirmer[tuple[ConfigDoc, list[OperatorCert]]] = Confirmer(
            start.running.version, start.running.sha256, start.floor)
        self._previous: Running | None = None  # what ran before the trial: applied again on rollback
        self._interrupted = start.interrupted
        # The final report of recent versions (refused, confirmed, rolled back): the collector re-sends a document
        # until it has a final report, so a redelivery that crossed that report gets the same answer again, not
        # "replayed". In memory: after a restart a redelivery of an older version is answered "replayed".
        self._finals: dict[int, tuple[str, Report]] = {}  # version -> (the document's sha256, its final report)
        self._files = ThreadPoolExecutor(1, thread_name_prefix="config")
        self._wake = asyncio.Event()
        self._inbox: deque[tuple[ConfigDoc, list[OperatorCert]]] = deque()  # bound: MAX_INBOX
        self._reload_wanted = False
        self._confirm_wanted = False
        self._lock = asyncio.Lock()  # one change of configuration at a time (push, confirm, rollback, reload)
        agent.running_config_version, agent.running_config_sha256 = start.running.version, start.running.sha256
        agent.config_control = self
        if agent.control is not None:  # edge_agent/control.py hands verified configuration documents here
            agent.control.on_config = self.on_config

    # -- events (event loop) ----------------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: reload what the agent would run at start; done by the task, after a trial if one runs."""
        self._reload_wanted = True
        self._wake.set()

    def acked(self, ranges: list[tuple[int, int]]) -> None:
        """Every end-to-end acknowledgement the agent verified (edge_agent/app.py `_downlink`)."""
        if self.confirmer.acked(ranges) is not None:
            self._confirm_wanted = True
            self._wake.set()

    def link_up(self, first: bool) -> None:
        """The agent's MQTT link is up; after the first connection, say what runs (and a trial cut short)."""
        if not first:
            return
        if self._interrupted is not None:
            self._report(config_report("rolled_back", self._interrupted, self.running, reason=ROLLED_BACK_INTERRUPTED,
                                       detail=f"the agent stopped while version {self._interrupted} was being tried; "
                                              f"it runs {self.running.origin}"))
            self._interrupted = None
        self._report(config_report("running", self.running.version, self.running, detail=self.running.origin))

    def on_config(self, doc: ConfigDoc, operators: list[OperatorCert]) -> None:
        """A configuration document, verified by the control dispatcher (wire.control.Trust.verify). Returns at
        once: the document is handled by this object's task, one change of configuration at a time."""
        if len(self._inbox) >= MAX_INBOX:
            self._refuse(doc.version, ControlReason.BUSY, f"{MAX_INBOX} configuration documents already wait to be "
                                                          f"handled")
            return
        self._inbox.append((doc, operators))
        self._wake.set()

    # -- a pushed document ------------------------------------------------------------------------------------

    async def _offer(self, doc: ConfigDoc, operators: list[OperatorCert]) -> None:
        version = doc.version
        decision = self.confirmer.offer(version, doc.sha256, (doc, operators))
        if isinstance(decision, Repeat):
            self._report(config_report(decision.state, version, self.running))
            return
        if isinstance(decision, Refuse):
            final = self._finals.get(version)
            if final is not None and final[0] == doc.sha256 and decision.reason == ControlReason.REPLAYED:
                self._report(final[1])  # a redelivery crossed the final report: the same answer again
                return
            self._refuse(version, decision.reason, decision.detail)
            return
        if isinstance(decision, Queued):
            if decision.replaced is not None:
                self._refuse(decision.replaced, ControlReason.BUSY,
                             f"version {version} arrived while version {self._trial_version()} was being tried, "
                             f"and replaced this one in the queue")
            log.info("configuration version %d waits: version %d is being tried", version, self._trial_version())
            self._report(config_report("received", version, self.running,
                                       detail=f"waits until version {self._trial_version()} is confirmed or "
                                              f"rolled back"))
            return
        assert isinstance(decision, Accept)
        if config_sha256(doc.toml) != doc.sha256:
            self._refuse(version, ControlReason.MALFORMED, "the sha256 in the document is not that of its text",
                         doc.sha256)
            return
        self._report(config_report("received", version, self.running))
        source = f"config version {version}"
        try:
            cfg = await self._in_thread(agent_config.load_text, doc.toml, source, self.local_path.resolve().parent)
        except ConfigError as exc:
            # the line `edge-agent check` prints
            self._refuse(version, ControlReason.INVALID_CONFIG, f"error: {exc}", doc.sha256)
            return
        key = fixed_change(self.running.cfg, cfg)
        if key is not None:
            self._refuse(version, ControlReason.PROTECTED_KEY,
                         f"{key}: a pushed configuration may not change it (the gateway's identity, state or trust "
                         f"anchors: change it in the local file, on the gateway)", doc.sha256)
            return
        approved_by = ", ".join(f"{o.name} ({o.role})" for o in operators) or "-"
        self.confirmer.begin(version, doc.sha256, doc.confirm_timeout_s)
        await self._in_thread(self.store.begin, version, doc.sha256, doc.toml, approved_by)
        trial = Running(cfg, version, doc.sha256, f"remote configuration version {version} (on trial)")
        self._previous = self.running
        log.info("applying configuration version %d approved by %s; confirm within %g s", version, approved_by,
                 doc.confirm_timeout_s)
        try:
            plan = await self.agent.reconfigure(cfg)
        except ReconfigureFailed as exc:  # found before anything was changed: the previous one still runs
            await self._roll_back(ROLLED_BACK_APPLY_FAILED, f"applying version {version} failed: {exc}",
                                  apply_previous=False)
            return
        self._set_running(trial)
        self.confirmer.applied(self.agent.fresh_seq(), time.monotonic())
        self.agent.request_probe()  # a message of its own, so that confirming needs no device to answer
        self._wake.set()
        self._report(config_report("applied", version, trial, detail=plan.describe()))

    def _refuse(self, version: int, reason: ControlReason, detail: str, sha256: str = "") -> None:
        log.warning("configuration version %d refused: %s: %s", version, reason, detail)
        self._report(config_report("refused", version, self.running, reason=reason, detail=detail), sha256)

    def _trial_version(self) -> int:
        return self.confirmer.trial.version if self.confirmer.trial else 0

    # -- the task: confirm, roll back, reload ------------------------------------------------------------------

    async def run(self) -> None:
        """Under the agent's supervisor: waits for the confirm deadline, an acknowledgement or SIGHUP."""
        while True:
            deadline = self.confirmer.deadline
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            async with self._lock:
                await self._step()

    async def _step(self) -> None:
        while self._inbox:
            await self._offer(*self._inbox.popleft())
        if self._confirm_wanted:
            self._confirm_wanted = False
            if self.confirmer.trial is not None:
                await self._confirm()
        due = self.confirmer.due(time.monotonic())
        if due is not None:
            await self._roll_back(ROLLED_BACK_NO_ACK, f"{due.why}: {self.agent.uplink_problem()}")
        if self.confirmer.trial is None:
            queued = self.confirmer.take_queued()
            if queued is not None:
                await self._offer(*queued)
            elif self._reload_wanted:
                self._reload_wanted = False
                await self._reload()
        elif self._reload_wanted:
            log.info("reload (SIGHUP) waits until configuration version %d is confirmed or rolled back",
                     self.confirmer.trial.version)

    async def _confirm(self) -> None:
        trial = self.confirmer.trial
        assert trial is not None
        await self._in_thread(self.store.confirm, trial.version)
        self.confirmer.confirmed()
        self._previous = None
        self._set_running(Running(self.running.cfg, trial.version, trial.sha256,
                                  f"remote configuration version {trial.version} ({self.store.confirmed_path})"))
        log.info("configuration version %d confirmed: a message sent after the apply was acknowledged end to end; "
                 "it is %s and runs after a restart", trial.version, self.store.confirmed_path)
        self._report(config_report("confirmed", trial.version, self.running), trial.sha256)

    async def _roll_back(self, reason: str, why: str, *, apply_previous: bool = True) -> None:
        trial, previous = self.confirmer.trial, self._previous
        assert trial is not None and previous is not None
        log.warning("configuration version %d rolled back: %s; %s", trial.version, why,
                    f"applying {previous.origin} again" if apply_previous else f"{previous.origin} still runs")
        if apply_previous:
            await self.agent.reconfigure(previous.cfg)
        await self._in_thread(self.store.drop_pending, self.confirmer.floor)
        self.confirmer.rolled_back()
        self._previous = None
        self._set_running(previous)
        self._report(config_report("rolled_back", trial.version, previous, reason=reason, detail=why), trial.sha256)

    async def _reload(self) -> None:
        """SIGHUP: what would run at start, applied live; a file that fails the check changes nothing. systemd
        hears RELOADING, then READY with the new status whatever happened (wire/systemd.py)."""
        service = self.agent.service
        service.reloading(f"reloading {self.local_path}")
        try:
            await self._reload_now()
        finally:
            service.ready(self.agent.service_status())

    async def _reload_now(self) -> None:
        try:
            start = await self._in_thread(what_to_run, self.local_path)
            key = fixed_change(self.running.cfg, start.running.cfg)
            if key is not None:
                raise ConfigError(str(self.local_path), key, "changing it needs a restart of the agent")
        except ConfigError as exc:
            log.error("reload (SIGHUP) refused, the running configuration is kept: error: %s", exc)
            return
        new = start.running
        plan = await self.agent.reconfigure(new.cfg)
        self.confirmer.now_running(new.version, new.sha256)
        self._set_running(new)
        log.info("reloaded (SIGHUP): running %s: %s", new.origin, plan.describe())
        self._report(config_report("running", new.version, new, detail=new.origin))

    # -- helpers -----------------------------------------------------------------------------------------------

    def _set_running(self, running: Running) -> None:
        self.running = running
        self.agent.running_config_version = running.version
        self.agent.running_config_sha256 = running.sha256

    def _report(self, report: Report, final_for_sha256: str = "") -> None:
        """Send `report`; a final one about a document (its sha256 given) is kept to answer redeliveries."""
        if final_for_sha256:
            self._finals.pop(int(report.id), None)
            self._finals[int(report.id)] = (final_for_sha256, report)
            while len(self._finals) > MAX_FINALS:
                del self._finals[next(iter(self._finals))]
        self.agent.send_report(report)

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._files, fn, *args)

    def close(self) -> None:
        self._files.shutdown(wait=False)


def reset(local_path: Path | str) -> str:
    """`edge-agent config reset FILE`: the local file runs from the next start or SIGHUP."""
    cfg = agent_config.load(local_path)
    store = ConfigStore(cfg.gateway.state_dir)
    version, floor = store.reset()
    if version is None:
        return (f"{local_path}: no remote configuration in {store.dir}: the local file already runs (pushed versions "
                f"must exceed {floor})")
    return (f"{local_path}: remote configuration version {version} removed from {store.dir}; the local file runs "
            f"from the agent's next start or reload (systemctl reload edge-agent); pushed versions must still exceed "
            f"{floor}")


def status(local_path: Path | str) -> str:
    """`edge-agent config status FILE`: which configuration the agent runs at its next start, and why."""
    cfg = agent_config.load(local_path)
    store = ConfigStore(cfg.gateway.state_dir)
    saved, confirmed, problem = store.saved()
    lines = []
    if confirmed is not None:
        lines.append(f"remote configuration version {confirmed.version} (sha256 {confirmed.sha256}) in "
                     f"{confirmed.path}: runs instead of {local_path}")
    else:
        lines.append(f"no remote configuration: {local_path} runs")
    if problem:
        lines.append(f"  not usable: {problem}")
    if saved.trying is not None or saved.pending_file:
        lines.append(f"  version {saved.trying} was being tried: dropped at the next start (interrupted)")
    lines.append(f"  pushed versions must exceed {saved.floor}")
    return "\n".join(lines)
