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
    assert "acknowledge stored messages to their gateways every 1s on gw/citynerve/v1/<gateway>/down/ack" in result.stdout
    assert "subscribe mqtts://127.0.0.1:8883 gw/citynerve/v1/+/up" in result.stdout


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


# --- no secret in a message ----------------------------------------------------------------------------------

SECRET = "hunter2-Secret"


@pytest.mark.parametrize(
    "url",
    [
        f"http://admin:{SECRET}@127.0.0.1:8086",
        f"https://admin:{SECRET}@influx.example:8443/",
        f"http://{SECRET}@127.0.0.1:8086",  # a token as the user part
        f"http://admin:{SECRET[:4]}#{SECRET[4:]}@127.0.0.1:8086",  # unescaped '#': urlsplit would cut it in two
        f"http://admin:{SECRET[:4]}/{SECRET[4:]}@127.0.0.1:8086",
        f"http://127.0.0.1:8086/write?u=admin&p={SECRET}",  # InfluxDB 1.x query credentials
        f"http://127.0.0.1:8086?token={SECRET}",
    ],
)
def test_a_url_holding_credentials_is_refused_without_showing_them(tmp_path, url: str) -> None:
    result = check(tmp_path, OK.replace('url = "http://127.0.0.1:8086"', f'url = "{url}"'))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'collector.toml'}: influx.url: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    for part in (SECRET, SECRET[:4], SECRET[4:]):
        assert part not in result.stderr, result.stderr
    assert "***" in result.stderr  # the technician still sees where the secret was


@pytest.mark.parametrize(
    "edit, key",
    [
        (("[mqtt]", "[mqtt]\npassword = 73195246"), "mqtt.password"),
        (('database = "citynerve"', 'username = "admin"\npassword = 73195246'), "influx.password"),
        (('database = "citynerve"', 'username = "admin"\npassword = 7319.5246'), "influx.password"),
        (('api = "v1"', 'api = "v2"\ntoken = 73195246\norg = "o"\nbucket = "b"'), "influx.token"),
    ],
)
def test_a_secret_of_the_wrong_type_is_not_quoted(tmp_path, edit: tuple[str, str], key: str) -> None:
    result = check(tmp_path, OK.replace(*edit))
    assert result.returncode == 2
    assert f"{key}: expected a string, " in result.stderr, result.stderr
    assert "73195246" not in result.stderr and "7319.5246" not in result.stderr


def test_check_summary_shows_no_secret(tmp_path) -> None:
    text = OK.replace("[mqtt]", f'[mqtt]\nusername = "collector-1"\npassword = "{SECRET}-mqtt"').replace(
        'database = "citynerve"', f'database = "citynerve"\nusername = "admin"\npassword = "{SECRET}"')
    result = check(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://user:pass@host:8086", "http://user:***@host:8086"),
        ("http://token@host", "http://***@host"),
        ("http://host:8086/x?u=a&p=b#frag", "http://host:8086/x?u=***&p=***#***"),
        ("http://host?bare-token", "http://host?***"),
        ("http://host:8086", "http://host:8086"),
        ("https://[::1]:8086/", "https://[::1]:8086/"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    from wire.config import redact_url

    assert redact_url(url) == shown


def test_redact_finds_urls_and_given_secrets_in_any_text() -> None:
    from wire.config import Secret, redact

    text = f"POST http://admin:{SECRET}@h:8086/write failed; server said: bad token tok-{SECRET}"
    assert redact(text, Secret(f"tok-{SECRET}"), None, "") == (
        "POST http://admin:***@h:8086/write failed; server said: bad token ***")


def _influx(**kwargs: object):
    from collector.influx.config import InfluxConfig
    from wire.config import convert

    return convert({"url": "http://127.0.0.1:1", **kwargs}, InfluxConfig, "collector.toml")


def test_a_down_influxdb_fails_without_showing_credentials() -> None:
    import socket

    from collector.influx.backends import V1Backend, WriteFailure

    with socket.socket() as s:  # a port nobody listens on: InfluxDB is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = V1Backend(_influx(url=f"http://127.0.0.1:{port}", username="admin", password=SECRET, timeout="2s"))
    with pytest.raises(WriteFailure) as info:
        backend.write(b"m v=1 1")
    assert info.value.retryable and "connection failed" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in repr(backend)


def test_a_server_echoing_credentials_has_them_removed_from_the_failure() -> None:
    """A misconfigured proxy in front of InfluxDB that quotes the request's credentials back in its error."""
    import base64
    import http.server
    import threading

    from collector.influx.backends import V1Backend, WriteFailure

    class Echo(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            auth = self.headers.get("Authorization", "")
            user_pass = base64.b64decode(auth.split()[1]).decode() if auth.startswith("Basic ") else auth
            body = (f'{{"error": "upstream http://{user_pass}@10.0.0.9:8086/write refused {auth} '
                    f'for {user_pass}"}}').encode()
            self.send_response(502)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        backend = V1Backend(_influx(url=url, username="admin", password=SECRET, gzip=False))
        with pytest.raises(WriteFailure) as info:
            backend.write(b"m v=1 1")
        assert info.value.status == 502 and "refused" in info.value.reason
        basic = base64.b64encode(f"admin:{SECRET}".encode()).decode()
        assert SECRET not in str(info.value) and basic not in str(info.value), info.value
        token_backend = V1Backend(_influx(url=url, token=f"tok-{SECRET}", gzip=False))
        with pytest.raises(WriteFailure) as info:
            token_backend.write(b"m v=1 1")
        assert SECRET not in str(info.value), info.value
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("types, expected", [
    ('[electricity]\npower = "double"\n', "electricity.power: expected one of float, integer, boolean, string, got 'double'"),
    ('[electricity]\npower = 3\n', "electricity.power: expected one of float, integer, boolean, string, got 3"),
    ('power = "float"\n', 'power: expected a table of field = "type"'),
    ("[electricity\n", "not valid TOML"),
])
def test_declared_field_types_are_checked_with_file_and_key(tmp_path, types: str, expected: str) -> None:
    (tmp_path / "types.toml").write_text(types)
    result = check(tmp_path, f'[schema]\nfield_types = "{tmp_path / "types.toml"}"\n')
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / 'types.toml'}: {expected}" or (
        expected in result.stderr and str(tmp_path / "types.toml") in result.stderr), result.stderr


@pytest.mark.parametrize("edit, expected", [
    ("[limits]\ngateway_messages = 99999\n", "limits.gateway_messages: expected at most max_messages (4096)"),
    ("[limits]\nwindow = \"0s\"\n", "limits.window: expected a duration > 0"),
    ("[limits]\nworkers = 0\n", "limits.workers"),
    ("[validation]\nmax_past = \"x\"\n", "validation.max_past"),
])
def test_limits_errors_name_the_key(tmp_path, edit: str, expected: str) -> None:
    result = check(tmp_path, edit)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
