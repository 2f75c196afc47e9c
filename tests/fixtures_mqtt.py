"""Fixtures for a real mosquitto with TLS (throwaway CA) on a free loopback port."""

from __future__ import annotations

import pytest

from labkit.mosquitto import MosquittoServer
from labkit.pki import LabCA
from wire.mqttlink import MqttSettings


@pytest.fixture(scope="session")
def lab_ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return LabCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory, lab_ca: LabCA):
    with MosquittoServer(tmp_path_factory.mktemp("mosquitto"), lab_ca) as server:
        yield server


def mqtt_settings(broker: MosquittoServer, **overrides: object) -> MqttSettings:
    """Settings for a client of `broker` over TLS, trusting the lab CA."""
    values: dict[str, object] = {
        "host": "127.0.0.1", "port": broker.port, "ca_file": str(broker.ca.cert_path),
        "reconnect_min": 1, "reconnect_max": 2,
    }
    values.update(overrides)
    return MqttSettings(**values)  # type: ignore[arg-type]
