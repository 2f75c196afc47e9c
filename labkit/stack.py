"""Config files and processes for the real programs (edge-agent, edge-collector), for tests, demo and benches."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from labkit.mosquitto import MosquittoServer
from labkit.pki import CertFiles
from labkit.process import ServerProcess


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def to_toml(doc: Mapping[str, Any]) -> str:
    """Top-level tables and arrays of tables of scalars/inline tables: all our config files need."""
    out: list[str] = []
    for section, body in doc.items():
        if isinstance(body, list):
            for item in body:
                out.append(f"[[{section}]]")
                out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items()]
                out.append("")
        else:
            out.append(f"[{section}]")
            out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in body.items()]
            out.append("")
    return "\n".join(out)


def mqtt_section(broker: MosquittoServer, cert: CertFiles | None = None, **extra: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "host": "127.0.0.1", "port": broker.port, "ca_file": str(broker.ca.cert_path), "reconnect_max": "2s",
    }
    if cert is not None:
        section.update(cert_file=str(cert.cert), key_file=str(cert.key))
    section.update(extra)
    return section


def modbus_tcp_device(device_id: str, port: int, *, unit: int = 1, interval: str = "1s",
                      profile: str = "eastron_sdm630", **extra: Any) -> dict[str, Any]:
    return {"kind": "modbus-tcp", "id": device_id, "profile": profile, "host": "127.0.0.1", "port": port,
            "unit": unit, "interval": interval, **extra}


def write_agent_config(path: Path, gateway: str, mqtt: dict[str, Any], devices: list[dict[str, Any]],
                       *, publish_interval: str = "1s", location: Mapping[str, float] | None = None,
                       **sections: dict[str, Any]) -> Path:
    doc: dict[str, Any] = {
        "gateway": {"id": gateway, "state_dir": str(path.parent / f"{gateway}-state"),
                    **({"location": location} if location else {})},
        "mqtt": mqtt,
        "uplink": {"publish_interval": publish_interval, **sections.pop("uplink", {})},
        **sections,
        "devices": devices,
    }
    path.write_text(to_toml(doc))
    return path


def write_collector_config(path: Path, mqtt: dict[str, Any] | None, influx: dict[str, Any],
                           **sections: dict[str, Any]) -> Path:
    """collector.toml; `mqtt` None: no [mqtt] section (the NATS tier's [nats] comes in `sections`)."""
    sections.setdefault("quarantine", {"path": str(path.with_suffix(".quarantine.db"))})
    sections.setdefault("inventory", {"path": str(path.with_suffix(".inventory.db"))})
    # The lab's plain mosquitto (labkit/mosquitto.py) mounts no topics; SecureBroker.collector_mqtt() gives the
    # shipped configuration's gateway_mount.
    inputs = {} if mqtt is None else {"mqtt": {"gateway_mount": "", **mqtt}}
    doc = {**inputs, "influx": {"flush_interval": "200ms", **influx}, **sections}
    path.write_text(to_toml(doc))
    return path


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _log_contains(path: Path, text: str) -> bool:
    try:
        return text in path.read_text(errors="replace")
    except OSError:
        return False


def program(name: str, config: Path, ready_text: str, *extra_args: str) -> ServerProcess:
    """`edge-agent run` / `edge-collector run` as a child process; ready once its log shows `ready_text`."""
    log = config.with_suffix(".log")
    return ServerProcess(
        name, [_bin(name), *extra_args, "run", str(config)], log,
        ready=lambda: _log_contains(log, ready_text),
    )


def collector_process(config: Path, *extra_args: str) -> ServerProcess:
    return program("edge-collector", config, "subscribed to", *extra_args)


def agent_process(config: Path, *extra_args: str, wait_for_broker: bool = True) -> ServerProcess:
    return program("edge-agent", config, "connected to MQTT broker" if wait_for_broker else "starting", *extra_args)


def quiet_collector(path: Path, broker: MosquittoServer, client_id: str, influx: dict[str, Any],
                    **sections: Any) -> ServerProcess:
    """A started collector for benchmarks: no stats lines, warnings only in the file (info on the command line,
    which the readiness check needs)."""
    sections.setdefault("log", {"stats_interval": "0s", "level": "warning"})
    config = write_collector_config(path, mqtt_section(broker, client_id=client_id), influx, **sections)
    return collector_process(config, "--log-level", "info").start()
