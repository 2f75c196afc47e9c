"""Start real server processes on free loopback ports and stop them without leftovers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def relay(src: socket.socket, dst: socket.socket) -> None:
    """Copy what `src` receives to `dst` until either side ends; then close both (as the peers' TCP would see
    it). For a thread of its own, one per direction of a proxied connection."""
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class SilentServer:
    """A TCP server on loopback that accepts connections and never answers (a Modbus device that is powered but
    mute, a hung gateway): requests pile up unread in the socket buffer. `port` is its port."""

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, name="silent-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._accepted.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._accepted:
            conn.close()
        self._listener.close()

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServerProcess:
    """One child process with its log file; `ready` is polled until it returns True.

    The child gets its own process group so that stop() also reaches anything it forked.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        ready: Callable[[], bool],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._ready = ready
        self._env = env
        self._cwd = cwd
        self._start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(self._env or {})},
            cwd=self._cwd,
            start_new_session=True,
        )
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail_log()}")
            if self._ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {self._start_timeout}s: {self.tail_log()}")

    def tail_log(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a power cut or an OOM kill would."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        with contextlib.suppress(AttributeError):
            self._log.close()

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LabServer:
    """Life cycle shared by the lab's servers: a temp dir of their own, fresh free ports on each first start
    (retried when another process took a port first), stop/kill/restart on the same ports and data.

    Subclasses set `name`, pick their ports in `_choose_ports()` and build the process in `_new_process()`.
    """

    name = "server"

    def __init__(self, directory: Path | str | None, start_timeout: float = 10.0) -> None:
        import tempfile

        self._own_dir = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix=f"{self.name}-")) if directory is None else Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = self.directory / f"{self.name}.log"
        self.start_timeout = start_timeout
        self.port = 0
        self._process: ServerProcess | None = None

    def _choose_ports(self) -> None:
        self.port = free_port()

    def _new_process(self) -> ServerProcess:
        raise NotImplementedError

    def _start_process(self) -> None:
        self._process = self._new_process()
        self._process.start()

    def _after_start(self) -> None:
        """Hook for set-up that needs the running server (e.g. creating users)."""

    def start(self):
        if self.port:
            self._start_process()
        else:
            for attempt in range(3):
                self._choose_ports()
                try:
                    self._start_process()
                    break
                except RuntimeError:
                    if attempt == 2 or "address already in use" not in self.tail_log().lower():
                        raise
        self._after_start()
        return self

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would."""
        if self._process is not None:
            self._process.kill()
            self._process.stop()  # closes the log file

    def restart(self) -> None:
        """Stop (if running) and start again on the same ports with the same data."""
        self.stop()
        self._start_process()

    def close(self) -> None:
        """Stop, and delete the directory when this object made it."""
        import shutil

        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tail_log(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
