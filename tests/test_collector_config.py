"""collector.toml: errors name the file and the key path; `check` summarises a valid file."""

from __future__ import annotations

import subprocess
import sys

import pytest

OK = """
[mqtt]
host = "127.0.0.1"
port = 8883
receive_maximum = 500

[influx]
api = "v1"
url = "http://127.0.0.1:8086"
database = "citynerve"

[validation]
min_time = 2020-01-01T00:00:00Z
"""


def check(tmp_path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "collector.toml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "collector.cli", "check", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_valid_config_is_summarised(tmp_path) -> None:
    result = check(tmp_path, OK)
    assert result.returncode == 0, result.stderr
    assert "receive maximum 500" in result.stdout and "database citynerve" in result.stdout
    assert "acknowledge stored messages to their gateways every 1s on citynerve/v1/<gateway>/down/ack" in result.stdout


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("receive_maximum = 500", "receive_maximum = 0"), "mqtt.receive_maximum: expected an integer 1..65535, got 0"),
        (('api = "v1"', 'api = "v3"'), 'influx.api: expected one of "v1", "v2", got "v3"'),
        (('api = "v1"', 'api = "v2"'), 'influx.'),
        (("min_time = 2020-01-01T00:00:00Z", 'min_time = "last year"'), "validation.min_time"),
        (("min_time = 2020-01-01T00:00:00Z", "min_time = 2020-01-01T00:00:00"),
         "validation.min_time: expected a date-time with a time zone"),
        (("[mqtt]", '[mqtt]\nshared_group = "a/b"'), "mqtt.shared_group"),
        (("[mqtt]", '[mqtt]\ntopic_prefix = "citynerve/#"'), "mqtt.topic_prefix"),
        (("[influx]", "[influx]\nbatch_sise = 10"), 'influx.batch_sise: unknown key (did you mean "batch_size"?)'),
        (("[mqtt]", "[acks]\ninterval = 0\n\n[mqtt]"), 'acks.interval: expected a duration > 0 such as "1s"'),
        (("[mqtt]", '[acks]\ninterval = "soon"\n\n[mqtt]'), 'acks.interval: expected a duration such as "10s"'),
        (("[mqtt]", '[acks]\nintervall = "1s"\n\n[mqtt]'), 'acks.intervall: unknown key (did you mean "interval"?)'),
    ],
)
def test_errors_name_the_key(tmp_path, edit: tuple[str, str], expected: str) -> None:
    result = check(tmp_path, OK.replace(*edit))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'collector.toml'}: ")
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
