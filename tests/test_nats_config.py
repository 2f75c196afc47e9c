"""The clustered broker tier's pure parts: collector.toml [nats] (errors name the key), the topic <-> subject mapping,
the stream and consumer the collectors make, and the users file `edge-collector nats users` writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from collector import config as collector_config
from collector.natsauth import NatsAuthError, collector_permissions, gateway_permissions, render_users
from collector.natsin import NatsMessage, consumer_config, stream_config
from wire import topics
from wire.config import ConfigError

NATS_OK = """
[nats]
servers = ["tls://nats-1.example.net:4222", "nats://10.0.0.2:4222"]

[influx]
url = "http://127.0.0.1:8086"
"""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collector.cli", *args], capture_output=True, text=True, timeout=60)


def load(tmp_path: Path, text: str) -> collector_config.CollectorConfig:
    path = tmp_path / "collector.toml"
    path.write_text(text)
    return collector_config.load(path)


def test_nats_replaces_mqtt_and_check_says_so(tmp_path: Path) -> None:
    cfg = load(tmp_path, NATS_OK)
    assert cfg.nats is not None and cfg.topic_prefix == "citynerve/v1" and cfg.gateway_mount == ""
    result = run_cli("check", str(tmp_path / "collector.toml"))
    assert result.returncode == 0, result.stderr
    assert ("consume NATS tls://nats-1.example.net:4222, nats://10.0.0.2:4222: stream CITYNERVE_UP "
            "(citynerve/v1/+/up|status|report, R3), durable consumer collectors") in result.stdout
    assert "on citynerve/v1/<gateway>/down/ack (QoS 1)" in result.stdout  # no mount point on this tier
    assert "subscribe mqtt" not in result.stdout


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("[influx]", "[mqtt]\nhost = \"b\"\n\n[influx]"), "nats: [nats] and [mqtt] are alternatives"),
        (('"nats://10.0.0.2:4222"', '"http://10.0.0.2"'),
         'nats.servers[1]: expected nats://HOST:PORT or tls://HOST:PORT, got "http://10.0.0.2"'),
        (("servers = [", "servers = []\nx = ["), "nats.x: unknown key"),
        (('"tls://nats-1.example.net:4222", ', ""), None),
        (("[influx]", '[nats2]\n[influx]'), "nats2: unknown key"),
        (("servers", 'topic_prefix = "city.v1"\nservers'),
         "nats.topic_prefix: \"city.v1\": '.' and ' ' cannot appear in an MQTT topic on nats-server 2.9"),
        (("servers", 'stream = "UP.1"\nservers'), "nats.stream: expected a string matching"),
        (("servers", "max_inflight = 30000\nservers"), "nats.max_inflight: expected at most max_ack_pending (20000)"),
        (("servers", "fetch_batch = 2000\nservers"), "nats.fetch_batch: expected at most max_inflight (1000)"),
        (("servers", 'ack_wait = "500ms"\nservers'), 'nats.ack_wait: expected a duration of at least 1s'),
        (("servers", 'cert_file = "/nonexistent.crt"\nservers'), "nats.key_file: cert_file and key_file go together"),
        (("servers", 'ca_file = "/nonexistent/ca.crt"\nservers'), "nats.ca_file: /nonexistent/ca.crt does not exist"),
        (("servers", "downlink_qos = 2\nservers"), "nats.downlink_qos"),
        (("servers", 'max_bytes = "lots"\nservers'), "nats.max_bytes"),
    ],
)
def test_nats_errors_name_the_key(tmp_path: Path, edit: tuple[str, str], expected: str | None) -> None:
    text = NATS_OK.replace(*edit)
    assert text != NATS_OK
    if expected is None:
        load(tmp_path, text)
        return
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert expected in str(err.value)
    assert str(err.value).startswith(str(tmp_path / "collector.toml"))


def test_topics_map_to_subjects_as_nats_server_does() -> None:
    assert topics.to_nats_subject("citynerve/v1/gw-1/up") == "citynerve.v1.gw-1.up"
    assert topics.to_nats_subject("citynerve/v1/+/status") == "citynerve.v1.*.status"
    assert topics.to_nats_subject("citynerve/v1/gw-1/down/#") == "citynerve.v1.gw-1.down.>"
    assert topics.from_nats_subject("citynerve.v1.gw-1.down.ack") == "citynerve/v1/gw-1/down/ack"
    assert topics.nats_unsupported("citynerve/v1/gw_1-a/up") is None
    assert "'.'" in (topics.nats_unsupported("citynerve/v1/gw.north/up") or "")
    assert "empty" in (topics.nats_unsupported("citynerve//up") or "")


def test_stream_and_consumer_follow_the_settings(tmp_path: Path) -> None:
    cfg = load(tmp_path, NATS_OK.replace("servers", 'topic_prefix = "city/v2"\nreplicas = 5\nmax_age = "1d"\n'
                                                   'max_msgs_per_gateway = 50\nack_wait = "10s"\nservers'))
    assert cfg.nats is not None
    stream = stream_config(cfg.nats)
    assert stream.subjects == ["city.v2.*.up", "city.v2.*.status", "city.v2.*.report"]
    assert (stream.retention, stream.storage, stream.discard) == ("workqueue", "file", "old")
    assert (stream.num_replicas, stream.max_age, stream.max_msgs_per_subject) == (5, 86400.0, 50)
    consumer = consumer_config(cfg.nats)
    assert (consumer.durable_name, consumer.name, consumer.ack_policy) == ("collectors", "collectors", "explicit")
    assert (consumer.ack_wait, consumer.max_deliver, consumer.max_ack_pending) == (10.0, -1, 20000)


def test_a_message_reads_like_pahos() -> None:
    msg = NatsMessage("citynerve/v1/gw-1/up", b"body", 7)
    msg.topic = b"citynerve/v1/gw-1/status"  # collector/app.py sets paho's topic as bytes
    assert (msg.topic, msg.payload, msg.mid, msg.qos, msg.retain) == ("citynerve/v1/gw-1/status", b"body", 7, 1, False)


def test_users_file_grants_each_gateway_its_own_topics_only() -> None:
    text = render_users([("gw-1", "ab" * 32), ("gw-2", "cd" * 32)], ["collector-1", "collector-2"],
                        prefix="citynerve/v1", stream="CITYNERVE_UP", consumer="collectors")
    lines = [ln.strip() for ln in text.splitlines()]
    gw1 = next(ln for ln in lines if f'"urn:citynerve:identity:{"ab" * 32}"' in ln)
    assert ('permissions: {publish: ["citynerve.v1.gw-1.up", "citynerve.v1.gw-1.status", "citynerve.v1.gw-1.report"], '
            'subscribe: ["citynerve.v1.gw-1.down.>", "$MQTT.sub.>"]}, allowed_connection_types: ["MQTT"]') in gw1
    assert "gw-2" not in gw1
    collector = next(ln for ln in lines if ln.startswith('{user: "CN=collector-2"'))
    assert 'allowed_connection_types: ["STANDARD"]' in collector
    for subject in ("$JS.API.CONSUMER.MSG.NEXT.CITYNERVE_UP.collectors", "$JS.ACK.CITYNERVE_UP.collectors.>",
                    "$MQTT.msgs.citynerve.v1.*.down.>", "citynerve.v1.*.down.>"):
        assert f'"{subject}"' in collector
    assert ">" not in [s.strip('"') for s in collector.split("[", 2)[1].split("]")[0].split(", ")]
    assert lines[3] == "users = [" and lines[-1] == "]"
    publish, subscribe = gateway_permissions("citynerve/v1", "gw-1")
    assert not any(s.startswith("$JS") for s in publish + subscribe)
    publish, subscribe = collector_permissions("citynerve/v1", "S", "C")
    assert subscribe == ["_INBOX.>"] and not any(s.endswith("API.>") or s == ">" for s in publish)


@pytest.mark.parametrize("gateways, collectors, expected", [
    ([("gw.north-1", "00" * 32)], ["collector-1"], "gateway gw.north-1: '.' and ' ' cannot appear"),
    ([("gw-1", "00" * 32)], ["gw-1"], "a collector certificate must have CN collector-<name>"),
    ([("gw-1", "00" * 32)], [], "no collector instance named"),
])
def test_users_file_refuses_what_the_tier_cannot_serve(gateways: list[tuple[str, str]], collectors: list[str],
                                                       expected: str) -> None:
    with pytest.raises(NatsAuthError, match=expected):
        render_users(gateways, collectors, prefix="citynerve/v1", stream="S", consumer="C")


def test_nats_users_cli(tmp_path: Path) -> None:
    from labkit import enrolled

    dep = enrolled.create(tmp_path / "dep", ["gw-a", "gw-b"])
    dep.revoke("gw-b")
    config = tmp_path / "collector.toml"
    config.write_text(NATS_OK + f'\n[security]\nkeys_dir = "{dep.keys_dir}"\nregistry = "{dep.registry}"\n')
    out = tmp_path / "users.conf"
    result = run_cli("nats", "users", str(config), "--collector", "collector-1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "1 gateway(s) (1 revoked left out), 1 collector instance(s)" in result.stdout
    text = out.read_text()
    assert "# gw-a" in text and "gw-b" not in text
    assert out.stat().st_mode & 0o777 == 0o600
    no_security = tmp_path / "plain.toml"
    no_security.write_text(NATS_OK)
    result = run_cli("nats", "users", str(no_security), "--collector", "collector-1", "--out", str(out))
    assert result.returncode == 2 and "no [security] section" in result.stderr
    result = run_cli("nats", "users", str(config), "--collector", "gw-a", "--out", str(out))
    assert result.returncode == 2 and "collector-<name>" in result.stderr
