"""wire/topics.py: the gateways' listener's mount point (mosquitto mount_point), and the collector's setting for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector import config as cconfig
from wire import topics
from wire.config import ConfigError


@pytest.mark.parametrize("mount_point", ["", "gw/", "gw/v1/", "a-b_c.d/", "gateways/city-1/"])
def test_valid_mount_points(mount_point: str) -> None:
    assert topics.is_valid_mount(mount_point)


@pytest.mark.parametrize("mount_point", ["gw", "/", "/gw/", "gw//", "g+/", "#/", "gw/#/", "$share/g/", "$SYS/",
                                         "gw\x00/", "a//b/"])
def test_invalid_mount_points(mount_point: str) -> None:
    assert not topics.is_valid_mount(mount_point)


def test_mount_and_unmount_are_inverse() -> None:
    for mount_point in ("", "gw/", "x/y/"):
        for topic in ("citynerve/v1/gw-1/up", "citynerve/v1/gw-1/down/ack", "citynerve/v1/+/status"):
            assert topics.unmount(mount_point, topics.mount(mount_point, topic)) == topic
    assert topics.mount("gw/", topics.subscription("citynerve/v1", topics.UP)) == "gw/citynerve/v1/+/up"
    assert topics.mount("gw/", topics.down("citynerve/v1", "gw-1", "ack")) == "gw/citynerve/v1/gw-1/down/ack"
    assert topics.mount("", "citynerve/v1/gw-1/up") == "citynerve/v1/gw-1/up"


@pytest.mark.parametrize("topic", ["citynerve/v1/gw-1/up", "gwx/citynerve/v1/gw-1/up", "g/citynerve", "gw", "gw/",
                                   "GW/citynerve/v1/gw-1/up", "x/gw/citynerve/v1/gw-1/up"])
def test_a_topic_outside_the_mount_point_is_none(topic: str) -> None:
    assert topics.unmount("gw/", topic) is None


def test_unmount_strips_exactly_once() -> None:
    assert topics.unmount("gw/", "gw/gw/citynerve/v1/gw-1/up") == "gw/citynerve/v1/gw-1/up"
    assert topics.unmount("", "gw/citynerve/v1/gw-1/up") == "gw/citynerve/v1/gw-1/up"
    assert topics.unmount("", "") is None


def _collector_toml(tmp_path: Path, mqtt_lines: str) -> Path:
    path = tmp_path / "collector.toml"
    path.write_text(f'[mqtt]\nhost = "127.0.0.1"\n{mqtt_lines}\n[influx]\nurl = "http://127.0.0.1:8086"\n'
                    f'[quarantine]\npath = "{tmp_path / "q.db"}"\n')
    return path


def test_collector_gateway_mount_setting(tmp_path: Path) -> None:
    default = cconfig.load(_collector_toml(tmp_path, ""))
    assert topics.is_valid_mount(default.mqtt.gateway_mount)
    assert cconfig.load(_collector_toml(tmp_path, 'gateway_mount = "gw/"')).mqtt.gateway_mount == "gw/"
    assert cconfig.load(_collector_toml(tmp_path, 'gateway_mount = ""')).mqtt.gateway_mount == ""
    for bad in ("gw", "$share/g/", "+/"):
        with pytest.raises(ConfigError, match=r"mqtt\.gateway_mount"):
            cconfig.load(_collector_toml(tmp_path, f'gateway_mount = "{bad}"'))


def test_is_own_topic_accepts_the_topic_with_or_without_a_mount_point_in_front() -> None:
    own = "citynerve/v1/gw-1/down/ack"
    for received in (own, "gw/" + own, "a/b/" + own):
        assert topics.is_own_topic(own, received), received
    for received in ("citynerve/v1/gw-2/down/ack", "citynerve/v1/gw-1/down/cmd", "xcitynerve/v1/gw-1/down/ack",
                     "/" + own, "gw//" + own, "+/" + own, "$share/g/" + own, own + "/x", "gw/" + own + "/x", ""):
        assert not topics.is_own_topic(own, received), received
