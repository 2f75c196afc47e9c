"""The metrics endpoint both programs share (wire/metrics.py): the `[metrics]` section, the pure answer to a request
head, the histogram, and the server on a real socket with its bounds (size, time, connections); the agent's and
the collector's families follow the Prometheus naming conventions. Scraping by a real Prometheus server is
tests/test_prometheus_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from labkit import stack
from labkit.process import free_port
from wire import config as wconfig
from wire.metrics import (
    Histogram,
    MetricsError,
    MetricsServer,
    MetricsSettings,
    answer,
)
from wire.prom import registry

# -- [metrics] --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("listen", "address"), [
    ("127.0.0.1:9108", ("127.0.0.1", 9108)),
    (9108, ("127.0.0.1", 9108)),
    ("9108", ("127.0.0.1", 9108)),
    ("[::1]:9108", ("::1", 9108)),
    ("localhost:9108", ("localhost", 9108)),
    ("127.0.0.53:80", ("127.0.0.53", 80)),
])
def test_listen_addresses(listen, address) -> None:
    assert wconfig.convert({"listen": listen}, MetricsSettings, "x.toml").address == address


@pytest.mark.parametrize(("raw", "message"), [
    ({"listen": "0.0.0.0:9108"}, "metrics.listen: 0.0.0.0 is not a loopback address: metrics have no authentication; "
                                 "set allow_remote = true to serve them beyond this machine"),
    ({"listen": ":9108"}, "metrics.listen: every address is not a loopback address"),
    ({"listen": "gw.example:9108"}, "metrics.listen: gw.example is not a loopback address"),
    ({"listen": "127.0.0.1:70000"}, "metrics.listen: expected a port 1..65535, got 70000"),
    ({"listen": "127.0.0.1"}, 'metrics.listen: expected "host:port", "[v6]:port" or a port, got "127.0.0.1"'),
    ({"listen": 9108, "allow_remote": "yes"}, "metrics.allow_remote: expected true or false"),
    ({"listen": 9108, "port": 1}, "metrics.port: unknown key"),
    ({}, "metrics.listen: required key is missing"),
])
def test_bad_metrics_sections_are_one_line_errors(tmp_path: Path, raw, message) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(stack.to_toml({"gateway": {"id": "gw-1", "state_dir": str(tmp_path)}, "metrics": raw}))
    from edge_agent.config import load

    with pytest.raises(wconfig.ConfigError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}: {message}")


def test_remote_listening_needs_allow_remote() -> None:
    settings = wconfig.convert({"listen": "0.0.0.0:9108", "allow_remote": True}, MetricsSettings, "x")
    assert settings.address == ("0.0.0.0", 9108)


def test_collector_section_has_per_gateway(tmp_path: Path) -> None:
    from collector import config

    path = tmp_path / "collector.toml"
    path.write_text(stack.to_toml({"metrics": {"listen": 9109, "per_gateway": False}}))
    assert config.load(path).metrics.per_gateway is False
    path.write_text(stack.to_toml({"metrics": {"listen": 9109}}))
    assert config.load(path).metrics.per_gateway is True


# -- the answer to a request head (sans-IO) --------------------------------------------------------------------


@pytest.mark.parametrize(("head", "status", "body"), [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200, True),
    (b"GET /metrics?name[]=up HTTP/1.1\r\n\r\n", 200, True),
    (b"GET /metrics HTTP/1.0\r\n\r\n", 200, True),
    (b"GET http://10.0.0.1:9108/metrics HTTP/1.1\r\n\r\n", 200, True),
    (b"HEAD /metrics HTTP/1.1\r\n\r\n", 200, False),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\n", 405, False),
    (b"DELETE /metrics HTTP/1.1\r\n\r\n", 405, False),
    (b"GET / HTTP/1.1\r\n\r\n", 404, False),
    (b"GET /metricsx HTTP/1.1\r\n\r\n", 404, False),
    (b"GET /metrics/ HTTP/1.1\r\n\r\n", 404, False),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 505, False),
    (b"GET /metrics\r\n\r\n", 400, False),
    (b"GET  /metrics HTTP/1.1\r\n\r\n", 400, False),
    (b"G(T /metrics HTTP/1.1\r\n\r\n", 400, False),
    (b"GET /metrics HTTQ/1.1\r\n\r\n", 400, False),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, False),  # TLS ClientHello on the plain port
])
def test_answer(head: bytes, status: int, body: bool) -> None:
    ans = answer(head)
    assert (ans.status, ans.body) == (status, body)
    if status == 405:
        assert ans.allow == "GET, HEAD"


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((0.01, 0.1, 1.0))
    for value in (0.001, 0.01, 0.05, 0.5, 0.7, 3.0):
        h.observe(value)
    # an observation equal to a bound belongs to that bucket (le: less than or equal)
    assert h.cumulative() == [("0.01", 2), ("0.1", 3), ("1.0", 5), ("+Inf", 6)]
    assert h.count == 6
    assert h.sum == pytest.approx(4.261)
    with pytest.raises(ValueError):
        Histogram((1.0, 0.5))


# -- the server on a real socket -------------------------------------------------------------------------------


async def _exchange(port: int, request: bytes, *, read: bool = True) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10) if read else b""
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def _server(renders: list[int] | None = None, render=None, **kwargs) -> MetricsServer:
    calls = renders if renders is not None else []

    def default_render() -> bytes:
        calls.append(1)
        return b"# TYPE x gauge\nx 1.0\n"

    return MetricsServer(MetricsSettings(listen=f"127.0.0.1:{free_port()}"), render or default_render,
                         "text/plain; version=0.0.4; charset=utf-8", **kwargs)


@contextlib.asynccontextmanager
async def serving(server: MetricsServer) -> AsyncIterator[MetricsServer]:
    await server.start()
    task = asyncio.create_task(server.serve())
    try:
        yield server
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_server_answers_get_head_404_405() -> None:
    async def main() -> None:
        renders: list[int] = []
        async with serving(_server(renders)) as server:
            status, headers, body = await _exchange(server.port, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (status, body) == (200, b"# TYPE x gauge\nx 1.0\n")
            assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert headers["Content-Length"] == str(len(body))
            assert headers["Connection"] == "close"
            status, headers, body = await _exchange(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert (status, body, headers["Content-Length"]) == (200, b"", "21")
            status, headers, _ = await _exchange(server.port, b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
            assert (status, headers["Allow"]) == (405, "GET, HEAD")
            status, _, _ = await _exchange(server.port, b"GET /admin HTTP/1.1\r\n\r\n")
            assert status == 404
            assert len(renders) == 2  # GET and HEAD rendered; nothing else did
            assert server.scrapes == 2

    asyncio.run(main())


def test_server_bounds_request_size_time_and_connections() -> None:
    async def main() -> None:
        async with serving(_server(request_timeout=0.3, max_connections=2)) as server:
            # a head larger than MAX_HEAD: 431, not read to its end
            status, _, _ = await _exchange(server.port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")
            assert status == 431
            # a client that never finishes its head: 408 after the request timeout
            status, _, _ = await _exchange(server.port, b"GET /metrics HTTP/1.1\r\n")
            assert status == 408
            # two slow clients hold both connections: the third is refused with 503 at once
            slow = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
            async with asyncio.timeout(5):
                while server.active < 2:  # until the server has taken both up
                    await asyncio.sleep(0.01)
            status, _, _ = await _exchange(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert status == 503
            assert server.refused == 1
            for _, writer in slow:
                writer.close()

    asyncio.run(main())


def test_a_failing_render_costs_one_scrape() -> None:
    async def main() -> None:
        calls = []

        def render() -> bytes:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a bug in a collector")
            return b"x 1\n"

        async with serving(_server(render=render)) as server:
            assert (await _exchange(server.port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 500
            assert (await _exchange(server.port, b"GET /metrics HTTP/1.1\r\n\r\n"))[:3:2] == (200, b"x 1\n")

    asyncio.run(main())


def test_a_port_in_use_is_one_line() -> None:
    async def main() -> None:
        first = _server()
        await first.start()
        second = MetricsServer(MetricsSettings(listen=f"127.0.0.1:{first.port}"), bytes, "text/plain")
        with pytest.raises(MetricsError, match=rf"^metrics.listen: cannot listen on 127.0.0.1:{first.port}: "
                                               r"[Aa]ddress already in use"):
            await second.start()
        first._server.close()

    asyncio.run(main())


# -- the programs' families ------------------------------------------------------------------------------------


def _check_names(text: str, prefix: str) -> set[str]:
    """Every family parses, is named by the conventions, and counters end in _total; returns the names."""
    names = set()
    for family in text_string_to_metric_families(text):
        if family.name.startswith(("process_", "python_")):
            continue
        assert family.name.startswith(prefix) or family.name == "citynerve_gateway_last_seen_timestamp_seconds"
        assert not family.name.endswith(("_ns", "_ms", "_milliseconds")), family.name
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
        names.add(family.name)
    return names


def test_agent_families(tmp_path: Path) -> None:
    from edge_agent.app import Agent
    from edge_agent.config import load
    from edge_agent.metrics import collect

    path = stack.write_agent_config(tmp_path / "agent.toml", "gw-1", {"host": "127.0.0.1", "tls": False},
                                    [stack.modbus_tcp_device("meter-a", 1502)], metrics={"listen": 9108})
    agent = Agent(load(path))
    text = generate_latest(registry(lambda: collect(agent))).decode()
    names = _check_names(text, "citynerve_agent_")
    assert {"citynerve_agent_device_polls", "citynerve_agent_device_answer_seconds", "citynerve_agent_outbox_messages",
            "citynerve_agent_outbox_oldest_age_seconds", "citynerve_agent_clock_synchronised",
            "citynerve_agent_messages_acked", "citynerve_agent_bus_busy_seconds"} <= names
    assert 'citynerve_agent_device_polls_total{device="meter-a"} 0.0' in text
    assert 'citynerve_agent_info{gateway="gw-1",version=' in text
    assert "process_resident_memory_bytes" in text


def test_collector_families(tmp_path: Path) -> None:
    from collector.app import Collector
    from collector.config import load
    from collector.metrics import collect

    path = stack.write_collector_config(tmp_path / "collector.toml", {"host": "127.0.0.1", "tls": False},
                                        {"api": "v1", "url": "http://127.0.0.1:1", "database": "x"},
                                        metrics={"listen": 9109})
    collector = Collector(load(path))
    collector.last_seen["gw-1"] = 1_700_000_000_500_000_000
    collector.rejections["bad_signature"] += 2
    collector.counters["declined.series_limit"] += 3
    text = generate_latest(registry(lambda: collect(collector))).decode()
    names = _check_names(text, "citynerve_collector_")
    assert {"citynerve_collector_messages", "citynerve_collector_influx_request_seconds",
            "citynerve_collector_influx_batch_lines", "citynerve_collector_quarantine_entries",
            "citynerve_gateway_last_seen_timestamp_seconds"} <= names
    assert 'citynerve_gateway_last_seen_timestamp_seconds{gateway="gw-1"} 1.7000000005e+09' in text
    assert 'citynerve_collector_messages_rejected_total{reason="bad_signature"} 2.0' in text
    assert 'citynerve_collector_readings_declined_total{reason="series_limit"} 3.0' in text
    assert 'citynerve_collector_gateways{state="online"} 0.0' in text
