"""A SIGHUP reload of collector.toml, its pure parts: which changes apply at once and which wait for a restart
(collector/reload.py), new admission limits for gateways already known (collector/admission.py), the registry
re-opened (collector/registry.py). The real collector reloading on SIGHUP: tests/test_systemd_notify.py."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from collector.admission import FairQueue, Limits
from collector.config import CollectorConfig
from collector.reasons import Reason
from collector.registry import GatewayRegistry
from collector.reload import changed_keys, plan
from wire.config import Duration, Secret, convert


def _config(**sections: dict) -> CollectorConfig:
    return convert({"influx": {"api": "v1", "database": "db"}, **sections}, CollectorConfig, "collector.toml")


def test_nothing_changed_nothing_to_do() -> None:
    old = _config()
    p = plan(old, _config())
    assert (p.applied, p.restart) == ([], []) and p.config == old


def test_safe_changes_apply_and_the_others_wait_for_a_restart() -> None:
    old = _config(mqtt={"host": "broker-a"}, limits={"messages_per_second": 200.0, "workers": 4})
    new = _config(mqtt={"host": "broker-b"}, limits={"messages_per_second": 50.0, "workers": 8},
                  log={"level": "debug"}, validation={"max_payload_bytes": 1000}, acks={"interval": 2.0})
    p = plan(old, new)
    assert sorted(p.applied) == ["acks.interval", "limits.messages_per_second", "log.level",
                                 "validation.max_payload_bytes"]
    assert sorted(p.restart) == ["limits.workers", "mqtt.host"]
    # What runs from now on: the new values of what applies, the old of the rest, never a mix within a key.
    assert p.config.limits.messages_per_second == 50.0 and p.config.log.level == "debug"
    assert p.config.limits.workers == 4 and p.config.mqtt.host == "broker-a"
    assert p.config.validation.max_payload_bytes == 1000 and float(p.config.acks.interval) == 2.0


def test_inventory_intervals_apply_and_its_file_waits_for_a_restart() -> None:
    old = _config(inventory={"path": "/a.db"})
    new = _config(inventory={"path": "/b.db", "health_interval": "0s", "info_interval": "10m",
                             "flush_interval": "5s", "max_gateways": 10})
    p = plan(old, new)
    assert sorted(p.applied) == ["inventory.flush_interval", "inventory.health_interval", "inventory.info_interval"]
    assert sorted(p.restart) == ["inventory.max_gateways", "inventory.path"]
    inv = p.config.inventory
    assert (float(inv.health_interval), float(inv.info_interval), float(inv.flush_interval)) == (0.0, 600.0, 5.0)
    assert (inv.path, inv.max_gateways) == ("/a.db", old.inventory.max_gateways)


def test_turning_the_stats_line_on_or_off_waits_for_a_restart() -> None:
    on, off = _config(log={"stats_interval": 60.0}), _config(log={"stats_interval": 0.0})
    assert plan(on, off).restart == ["log.stats_interval"] and plan(off, on).restart == ["log.stats_interval"]
    assert float(plan(on, off).config.log.stats_interval) == 60.0
    p = plan(on, _config(log={"stats_interval": 30.0}))
    assert p.applied == ["log.stats_interval"] and float(p.config.log.stats_interval) == 30.0


def test_only_accept_plain_of_the_security_section_applies(tmp_path: Path) -> None:
    keys, registry = tmp_path / "keys", tmp_path / "gateways.db"
    keys.mkdir()
    registry.touch()
    sec = {"keys_dir": str(keys), "registry": str(registry)}
    old = _config(security={**sec, "accept_plain": False})
    p = plan(old, _config(security={**sec, "accept_plain": True, "replay_window": 8192}))
    assert (p.applied, p.restart) == (["security.accept_plain"], ["security.replay_window"])
    assert p.config.security is not None and p.config.security.accept_plain
    assert p.config.security.replay_window == old.security.replay_window  # type: ignore[union-attr]
    assert plan(_config(), old).restart == ["security"]  # sealing turned on: a restart (keys, opener)


def test_secrets_compare_by_value_and_origin() -> None:
    class S(msgspec.Struct):
        password: Secret
        timeout: Duration

    a = S(Secret("x", "env INFLUX_PASSWORD"), Duration(5))
    assert changed_keys(a, S(Secret("x", "env INFLUX_PASSWORD"), Duration(5))) == []
    assert changed_keys(a, S(Secret("y", "env INFLUX_PASSWORD"), Duration(5))) == ["password"]
    assert changed_keys(a, S(Secret("x", "inline"), Duration(6))) == ["password", "timeout"]


def test_new_limits_reach_the_gateways_already_known() -> None:
    q = FairQueue(Limits(rate=1.0, burst=3.0))
    for _ in range(3):
        assert q.offer("gw-1", object(), 10, now=0.0) is None
        assert q.take() is not None
        q.done("gw-1")
    assert q.offer("gw-1", object(), 10, now=0.0) == Reason.RATE_LIMITED  # its burst is spent
    q.set_limits(Limits(rate=10.0, burst=100.0), now=0.0)
    assert q.offer("gw-1", object(), 10, now=0.0) == Reason.RATE_LIMITED  # a higher burst gives no tokens at once
    assert q.offer("gw-1", object(), 10, now=0.15) is None  # but the new rate refills it (10/s)
    q.set_limits(Limits(rate=10.0, burst=1.0), now=10.0)
    taken = [q.offer("gw-1", object(), 10, now=10.0) for _ in range(2)]
    assert taken == [None, Reason.RATE_LIMITED]  # a lower burst caps the tokens kept
    assert q.limits.burst == 1.0


def _key() -> ed25519.Ed25519PublicKey:
    return ed25519.Ed25519PrivateKey.generate().public_key()


@pytest.mark.parametrize("way", ["revoked", "file made anew"])
def test_a_reopened_registry_is_read_whole(tmp_path: Path, way: str) -> None:
    path = tmp_path / "gateways.db"
    with GatewayRegistry(path, create=True) as writer:
        writer.add("gw-1", _key())
    reader = GatewayRegistry(path)
    assert reader.status("gw-1") == "active"
    key = reader.lookup("gw-1")
    reader.reopen()
    assert reader.lookup("gw-1") is key  # unchanged: the same object, so the opener's sessions of it stay
    if way == "revoked":
        with GatewayRegistry(path) as writer:
            writer.revoke("gw-1")
        reader.reopen()
        assert reader.status("gw-1") == "revoked"
    else:  # deleted and made again by `gateways add`: the reader's old connection still reads the old file
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        with GatewayRegistry(path, create=True) as writer:
            writer.add("gw-2", _key())
        reader.refresh_if_changed()
        assert reader.status("gw-2") == "unknown"
        reader.reopen()
        assert (reader.status("gw-1"), reader.status("gw-2")) == ("unknown", "active")
    reader.close()


def test_a_registry_that_cannot_be_reopened_keeps_what_was_read(tmp_path: Path) -> None:
    path = tmp_path / "gateways.db"
    with GatewayRegistry(path, create=True) as writer:
        writer.add("gw-1", _key())
    reader = GatewayRegistry(path)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with pytest.raises(Exception, match="no gateway registry here"):
        reader.reopen()
    assert reader.status("gw-1") == "active"
    reader.close()
