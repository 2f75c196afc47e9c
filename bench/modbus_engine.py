"""Modbus engine overhead: points decoded per second by the agent's poll path (BusEngine.poll of the
eastron_sdm630 profile over Modbus TCP) divided by a bare pymodbus AsyncModbusTcpClient doing the same reads and
decoding the same points with struct, against the same server, in the same run.

    python -m bench.modbus_engine [--rounds 5] [--seconds 3] [--slice 0.25] [--pin] [--profile]

Two servers, each in a process of its own (`--pin`: the client on the first core, the server on the second):
- "meter_sim": labkit.meter_sim, the simulated SDM630 on pymodbus' ModbusTcpServer (the reference server);
- "fast": a minimal blocking-socket responder written here that answers each FC4 request from a precomputed
  frame, so that the server is not the bottleneck and the ratio says something about the client side.

Per server, both clients are connected at once; in each round each polls for `--seconds` in alternating turns
of `--slice` seconds (which cancels drift of the machine); the result is the median of the per-round ratios
(engine points/s / baseline points/s), with their spread. Also reported: this process's CPU time per decoded
point for each client (the server runs elsewhere), which says what the client side costs whatever the server's
speed. `--profile` adds a cProfile of the engine's poll loop against the fast responder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

from edge_agent.modbus.bus import BusEngine, PolledDevice
from edge_agent.modbus.config import ModbusBus, ModbusTcpDevice
from edge_agent.modbus.devices import polled_device
from edge_agent.profiles import load_profile
from labkit.process import ServerProcess, free_port, port_is_open

REPO = Path(__file__).resolve().parent.parent
PROFILE = "eastron_sdm630"
UNIT = 1
PINNED: tuple[int, int] | None = None  # (client cpu, server cpu) with --pin


# --- the servers ----------------------------------------------------------------------------------------------------


def sdm630_input_registers() -> list[int]:
    """One plausible SDM630 snapshot as the simulator would serve it (registers 0x0000..0x004F)."""
    import random

    from labkit.meter_sim import INPUT_BLOCK, SDM630_INPUT, MeterModel, float32_registers

    values = MeterModel(random.Random(1)).measure(1_790_000_000.0)
    registers = [0] * INPUT_BLOCK
    for name, address in SDM630_INPUT.items():
        registers[address], registers[address + 1] = float32_registers(values[name])
    return registers


def _answer_connection(conn: socket.socket, data: bytes) -> None:
    """Answer MBAP FC4 requests on one connection; the answer after the transaction id is cached per request."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cache: dict[bytes, bytes] = {}
    buf = b""
    with conn:
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            out = []
            while len(buf) >= 7:
                size = 6 + int.from_bytes(buf[4:6], "big")
                if len(buf) < size:
                    break
                frame, buf = buf[:size], buf[size:]
                key = frame[6:]  # unit id + request PDU
                tail = cache.get(key)
                if tail is None:
                    unit = key[0]
                    if len(key) == 6 and key[1] == 4:
                        address, count = struct.unpack(">HH", key[2:6])
                        if 1 <= count <= 125 and 2 * (address + count) <= len(data):
                            pdu = bytes((4, 2 * count)) + data[2 * address: 2 * (address + count)]
                        else:
                            pdu = bytes((0x84, 2))
                    else:
                        pdu = bytes(((key[1] if len(key) > 1 else 0) | 0x80, 1))
                    tail = struct.pack(">HHB", 0, len(pdu) + 1, unit) + pdu
                    cache[key] = tail
                out.append(frame[:2] + tail)
            if out:
                conn.sendall(b"".join(out))


def fast_responder(port: int) -> None:
    """(child process) Listen on 127.0.0.1:port and answer FC4 reads of the SDM630 snapshot at once."""
    data = b"".join(r.to_bytes(2, "big") for r in sdm630_input_registers())
    server = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_answer_connection, args=(conn, data), daemon=True).start()


def pin(cpu: int, pid: int = 0) -> None:
    """Keep a process on one core (client and server each on their own: less scheduling noise)."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(pid, {cpu})


def start_server(kind: str, work: Path) -> tuple[ServerProcess, int]:
    port = free_port()
    if kind == "meter_sim":
        argv = [sys.executable, "-m", "labkit.meter_sim", "--port", str(port), "--seed", "1"]
    else:
        argv = [sys.executable, "-m", "bench.modbus_engine", "--fast-responder", str(port)]
    proc = ServerProcess(kind, argv, work / f"{kind}.log", lambda: port_is_open(port), cwd=REPO).start()
    if PINNED:
        assert proc.proc is not None
        pin(PINNED[1], proc.proc.pid)
    return proc, port


# --- the two clients ------------------------------------------------------------------------------------------------


def make_device(port: int) -> PolledDevice:
    device = ModbusTcpDevice(id="sdm630", profile=PROFILE, host="127.0.0.1", port=port, unit=UNIT)
    return polled_device(device, load_profile(PROFILE))


class EngineClient:
    """The agent's poll path: BusEngine.poll of the SDM630 device; a poll's points are the fields it emitted."""

    name = "engine"

    def __init__(self, port: int) -> None:
        self.device = make_device(port)
        bus = ModbusBus(id="bench", target=f"tcp://127.0.0.1:{port}", timeout=2.0)
        self.engine = BusEngine(bus, [self.device])

    async def open(self) -> None:
        if not await self.engine.open_once():
            raise RuntimeError(self.engine.last_open_error)

    async def poll(self) -> int:
        outcome = await self.engine.poll(self.device)
        if outcome.error:
            raise RuntimeError(f"engine poll failed: {outcome.error}")
        return sum(len(r.fields) for r in outcome.readings)

    async def close(self) -> None:
        await self.engine.transport.close()


def baseline_requests(port: int) -> list[tuple[int, int, list[tuple[str, int]]]]:
    """The engine's plan as (address, count, [(field, byte offset)]): the same reads, the same points."""
    out = []
    for request in make_device(port).plan:
        assert request.table == "input"
        out.append((request.address, request.count, [(s.field, 2 * s.offset) for s in request.slots]))
    return out


class PymodbusClient:
    """A bare AsyncModbusTcpClient reading the engine's plan; float32 ABCD points decoded with struct, a
    non-finite value left out (as the engine leaves out NaN)."""

    name = "pymodbus"

    def __init__(self, port: int) -> None:
        from pymodbus.client import AsyncModbusTcpClient

        self.requests = baseline_requests(port)
        self.client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)

    async def open(self) -> None:
        if not await self.client.connect():
            raise RuntimeError("pymodbus could not connect")

    async def poll(self) -> int:
        values: dict[str, float] = {}
        for address, count, slots in self.requests:
            rr = await self.client.read_input_registers(address, count=count, device_id=UNIT)
            if rr.isError():
                raise RuntimeError(f"pymodbus read {address}+{count} failed: {rr}")
            data = struct.pack(f">{count}H", *rr.registers)
            for name, offset in slots:
                value = struct.unpack_from(">f", data, offset)[0]
                if math.isfinite(value):
                    values[name] = value
        return len(values)

    async def close(self) -> None:
        self.client.close()


async def polls_for(client, seconds: float) -> tuple[int, float, float]:
    """(points, seconds, CPU seconds of this process) of polls back to back for about `seconds`."""
    points = 0
    cpu = time.process_time()
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        points += await client.poll()
        now = time.perf_counter()
        if now >= deadline:
            return points, now - start, time.process_time() - cpu


async def measure_async(port: int, rounds: int, seconds: float, slice_s: float) -> list[dict[str, float]]:
    """Both clients connected at once; per round each gets `seconds` in alternating slices of `slice_s`."""
    clients = [EngineClient(port), PymodbusClient(port)]
    for client in clients:
        await client.open()
    try:
        for client in clients:  # warm-up, and a check that every point decodes
            points = await client.poll()
            if points != sum(len(r[2]) for r in baseline_requests(port)):
                raise RuntimeError(f"{client.name} decoded {points} points")
        per_round = []
        slices = max(1, round(seconds / slice_s))
        for i in range(rounds):
            totals = {c.name: [0, 0.0, 0.0] for c in clients}
            for j in range(slices):
                order = clients if (i + j) % 2 == 0 else clients[::-1]
                for client in order:
                    for k, value in enumerate(await polls_for(client, seconds / slices)):
                        totals[client.name][k] += value
            rates = {name: points / elapsed for name, (points, elapsed, _) in totals.items()}
            rates["ratio"] = rates["engine"] / rates["pymodbus"]
            for name, (points, _, cpu) in totals.items():
                rates[f"{name}_cpu_us_per_point"] = cpu / points * 1e6
            rates["cpu_ratio"] = rates["pymodbus_cpu_us_per_point"] / rates["engine_cpu_us_per_point"]
            per_round.append(rates)
            print(f"    round {i + 1}: engine {rates['engine']:9,.0f} points/s  pymodbus {rates['pymodbus']:9,.0f} "
                  f"points/s  ratio {rates['ratio']:.3f}   client CPU per point: engine "
                  f"{rates['engine_cpu_us_per_point']:.2f} us, pymodbus {rates['pymodbus_cpu_us_per_point']:.2f} us",
                  flush=True)
        return per_round
    finally:
        for client in clients:
            await client.close()


def measure(port: int, rounds: int, seconds: float, slice_s: float) -> dict:
    per_round = asyncio.run(measure_async(port, rounds, seconds, slice_s))
    ratios = [r["ratio"] for r in per_round]
    return {
        "engine_points_per_s": round(statistics.median(r["engine"] for r in per_round)),
        "pymodbus_points_per_s": round(statistics.median(r["pymodbus"] for r in per_round)),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "rounds": [round(r, 3) for r in ratios],
        # client CPU time per point (this process only; the server runs in another), and engine points per
        # CPU second / pymodbus points per CPU second: what the client side costs, whatever the server's speed
        "engine_cpu_us_per_point": round(statistics.median(r["engine_cpu_us_per_point"] for r in per_round), 2),
        "pymodbus_cpu_us_per_point": round(statistics.median(r["pymodbus_cpu_us_per_point"] for r in per_round), 2),
        "cpu_ratio": round(statistics.median(r["cpu_ratio"] for r in per_round), 3),
    }


def profile_engine(port: int, seconds: float, top: int = 25) -> str:
    async def polls() -> tuple[int, float]:
        client = EngineClient(port)
        await client.open()
        try:
            await client.poll()
            profiler.enable()
            try:
                return (await polls_for(client, seconds))[:2]
            finally:
                profiler.disable()
        finally:
            await client.close()

    profiler = cProfile.Profile()
    points, elapsed = asyncio.run(polls())
    out = io.StringIO()
    print(f"cProfile of the engine's polls: {points} points in {elapsed:.2f} s (profiled, so slower)", file=out)
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    print("The agent's own functions, by cumulative time:", file=out)
    stats.sort_stats("cumulative").print_stats("edge_agent|wire", top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per client and round")
    parser.add_argument("--slice", type=float, default=0.25,
                        help="seconds per turn: the clients alternate in turns this long within a round")
    parser.add_argument("--servers", default="meter_sim,fast", help="comma-separated: meter_sim, fast")
    parser.add_argument("--pin", action="store_true",
                        help="pin the client to the first core and the server to the second")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the engine's polls")
    parser.add_argument("--fast-responder", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fast_responder is not None:
        fast_responder(args.fast_responder)
        return {}

    global PINNED
    cpus = os.sched_getaffinity(0)
    if args.pin and len(cpus) >= 2:
        PINNED = (min(cpus), max(cpus))
        pin(PINNED[0])
    try:
        return run(args)
    finally:
        PINNED = None
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)


def run(args: argparse.Namespace) -> dict:
    plan = make_device(1).plan
    result: dict = {
        "profile": PROFILE, "requests_per_poll": len(plan), "points_per_poll": sum(len(r.slots) for r in plan),
        "rounds": args.rounds, "seconds": args.seconds, "slice": args.slice, "pinned": PINNED is not None,
    }
    with tempfile.TemporaryDirectory(prefix="bench-modbus-engine-") as tmp:
        for kind in args.servers.split(","):
            print(f"  server {kind}:", flush=True)
            proc, port = start_server(kind, Path(tmp))
            try:
                result[kind] = measure(port, args.rounds, args.seconds, args.slice)
                result[kind]["engine_transactions_per_s"] = round(
                    result[kind]["engine_points_per_s"] / result["points_per_poll"] * result["requests_per_poll"])
                if args.profile and kind == "fast":
                    print(profile_engine(port, args.seconds))
            finally:
                proc.stop()

    print()
    print(f"{'server':<10} {'engine points/s':>16} {'pymodbus points/s':>18} {'ratio':>7}  {'spread':<12} "
          f"{'engine tx/s':>11} {'CPU us/point engine':>20} {'pymodbus':>8} {'CPU ratio':>9}")
    for kind in args.servers.split(","):
        r = result[kind]
        print(f"{kind:<10} {r['engine_points_per_s']:>16,} {r['pymodbus_points_per_s']:>18,} {r['ratio']:>7.3f}  "
              f"{r['ratio_min']:.3f}..{r['ratio_max']:.3f}  {r['engine_transactions_per_s']:>11,} "
              f"{r['engine_cpu_us_per_point']:>20.2f} "
              f"{r['pymodbus_cpu_us_per_point']:>8.2f} {r['cpu_ratio']:>9.3f}")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
