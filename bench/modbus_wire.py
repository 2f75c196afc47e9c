"""Modbus wire efficiency: transactions/s of the agent's engine (BusEngine.poll) on a serial line simulated with
real timing (labkit.serial_lab.TimedLine), divided by the line's theoretical limit (frames.rtu_cycle_time), at
9600 and 115200 baud. A bare pymodbus AsyncModbusSerialClient doing the same reads on the same line is measured
alongside, for context.

    python -m bench.modbus_wire [--bauds 9600,115200] [--rounds 3] [--seconds 3]

Two polls: one FC4 read of 10 registers ("n10"), and the eastron_sdm630 profile's plan (7 FC4 reads of 2..36
registers, "sdm630"). The device is pymodbus' ModbusSerialServer (labkit.serial_lab.SerialModbusServer) in a
process of its own on the line's server end. The line delays every character by its time on the wire at the
baud rate (8N1), holds the device's answer until t3.5 after the request (its turnaround), and measures the gaps
the master leaves before its requests.

Limit per poll: the sum over its requests of rtu_cycle_time(8, 5 + 2 * count, baud) (request, t3.5 turnaround,
answer, t3.5), so limit transactions/s = requests per poll / that sum. Ratio = measured / limit; rounds
alternate the engine and pymodbus (each opens the port exclusively for its turn); the median is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import signal
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

from edge_agent.modbus import frames
from edge_agent.modbus.bus import BusEngine, PolledDevice
from edge_agent.modbus.config import ModbusBus, ModbusDevice
from edge_agent.modbus.decode import make_decoder
from edge_agent.modbus.devices import plan_for
from edge_agent.modbus.plan import PointSpec, ReadRequest, plan_reads
from edge_agent.profiles import load_profile
from labkit.process import ServerProcess
from labkit.serial_lab import TimedLine

REPO = Path(__file__).resolve().parent.parent
UNIT = 1
REQUEST_CHARS = 8  # unit, function, address, count, CRC


def plans() -> dict[str, list[ReadRequest]]:
    float32 = make_decoder("float32")
    n10 = plan_reads([PointSpec(f"p{i}", "input", 2 * i, 2, float32, "m") for i in range(5)], 125)
    assert len(n10) == 1 and n10[0].count == 10
    sdm630 = plan_for(ModbusDevice(id="sdm630", bus="rs485", profile="eastron_sdm630"), load_profile("eastron_sdm630"))
    return {"n10": n10, "sdm630": sdm630}


def limit_per_s(plan: list[ReadRequest], baud: int) -> float:
    """Theoretical transactions/s of back-to-back polls of `plan` on an 8N1 line at `baud`."""
    cycle = sum(frames.rtu_cycle_time(REQUEST_CHARS, 5 + 2 * r.count, baud) for r in plan)
    return len(plan) / cycle


# --- the device, in a process of its own ------------------------------------------------------------------------------


def device_main(path: str, baud: int) -> None:
    """(child process) pymodbus' serial server for unit 1 on `path` (the SDM630 snapshot as input registers)."""
    from bench.modbus_engine import sdm630_input_registers
    from labkit.serial_lab import serial_modbus_server

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with serial_modbus_server(path, {UNIT: {"input": sdm630_input_registers()}}, baud=baud):
        print("device ready", flush=True)
        stop.wait()


def start_device(path: str, baud: int, work: Path) -> ServerProcess:
    log = work / f"device-{baud}.log"
    argv = [sys.executable, "-m", "bench.modbus_wire", "--device-on", path, "--baud", str(baud)]

    def ready() -> bool:
        return log.exists() and "device ready" in log.read_text(errors="replace")

    return ServerProcess(f"device-{baud}", argv, log, ready, cwd=REPO).start()


# --- the two masters ----------------------------------------------------------------------------------------------


class EngineMaster:
    name = "engine"

    def __init__(self, path: str, baud: int, plan: list[ReadRequest]) -> None:
        self.device = PolledDevice(id="meter", unit=UNIT, interval=1.0, plan=plan, tags={})
        self.engine = BusEngine(ModbusBus(id="rs485", target=path, baud=baud, timeout=1.0), [self.device])

    async def open(self) -> None:
        if not await self.engine.open_once():
            raise RuntimeError(self.engine.last_open_error)

    async def poll(self) -> None:
        outcome = await self.engine.poll(self.device)
        if outcome.error or not outcome.readings:
            raise RuntimeError(f"engine poll failed: {outcome.error or 'no readings'}")

    async def close(self) -> None:
        await self.engine.transport.close()


class PymodbusMaster:
    name = "pymodbus"

    def __init__(self, path: str, baud: int, plan: list[ReadRequest]) -> None:
        from pymodbus.client import AsyncModbusSerialClient

        self.requests = [(r.address, r.count, [2 * s.offset for s in r.slots]) for r in plan]
        self.client = AsyncModbusSerialClient(path, baudrate=baud, timeout=1.0, retries=0)

    async def open(self) -> None:
        if not await self.client.connect():
            raise RuntimeError("pymodbus could not open the port")

    async def poll(self) -> None:
        for address, count, offsets in self.requests:
            rr = await self.client.read_input_registers(address, count=count, device_id=UNIT)
            if rr.isError():
                raise RuntimeError(f"pymodbus read {address}+{count} failed: {rr}")
            data = struct.pack(f">{count}H", *rr.registers)
            if not all(math.isfinite(struct.unpack_from(">f", data, o)[0]) for o in offsets):
                raise RuntimeError("pymodbus: a point did not decode")

    async def close(self) -> None:
        self.client.close()
        await asyncio.sleep(0.05)  # let the transport release the port before the next master opens it


async def run_master(make_master, line: TimedLine, requests: int, seconds: float) -> dict:
    master = make_master()  # inside the loop: pymodbus' client wants a running one
    await master.open()
    try:
        await master.poll()  # warm-up: the first transaction after opening is not timed
        await master.poll()
        line.reset()
        polls = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            await master.poll()
            polls += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        elapsed = now - start
    finally:
        await master.close()
    report = line.report()
    transactions = polls * requests
    if report["frames_to_server"] != transactions or report["frames_to_client"] != transactions:
        raise RuntimeError(f"{master.name}: {transactions} transactions timed but the line saw "
                           f"{report['frames_to_server']} requests and {report['frames_to_client']} answers")
    return {"tx_per_s": transactions / elapsed, "transactions": transactions, "line": report}


def measure(line: TimedLine, path: str, baud: int, plan_name: str, plan: list[ReadRequest], rounds: int,
            seconds: float) -> dict:
    limit = limit_per_s(plan, baud)
    masters = {"engine": EngineMaster, "pymodbus": PymodbusMaster}
    runs: dict[str, list[dict]] = {name: [] for name in masters}
    for i in range(rounds):
        order = list(masters) if i % 2 == 0 else list(masters)[::-1]
        for name in order:
            make = functools.partial(masters[name], path, baud, plan)
            run = asyncio.run(run_master(make, line, len(plan), seconds))
            runs[name].append(run)
            line_report = run["line"]
            print(f"    {baud:>6} {plan_name:<7} round {i + 1} {name:<9} {run['tx_per_s']:7.1f} tx/s  "
                  f"ratio {run['tx_per_s'] / limit:.3f}  master gap median "
                  f"{1000 * (line_report['master_gap_median'] or 0):.2f} ms (t3.5 {1000 * line_report['silence']:.2f}), "
                  f"silence violations {line_report['silence_violations']}, device delay median "
                  f"{1000 * (line_report['device_delay_median'] or 0):.2f} ms, late max "
                  f"{1000 * (line_report['late_max'] or 0):.3f} ms", flush=True)
    out: dict = {"limit_tx_per_s": round(limit, 2), "requests_per_poll": len(plan),
                 "registers_per_poll": sum(r.count for r in plan)}
    for name, results in runs.items():
        ratios = [r["tx_per_s"] / limit for r in results]
        reports = [r["line"] for r in results]
        out[name] = {
            "tx_per_s": round(statistics.median(r["tx_per_s"] for r in results), 2),
            "ratio": round(statistics.median(ratios), 3),
            "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3),
            "master_gap_median_ms": round(1000 * statistics.median(r["master_gap_median"] for r in reports), 3),
            "master_gap_min_ms": round(1000 * min(r["master_gap_min"] for r in reports), 3),
            "silence_violations": sum(r["silence_violations"] for r in reports),
            "device_delay_median_ms": round(1000 * statistics.median(r["device_delay_median"] for r in reports), 3),
            "line_late_max_ms": round(1000 * max(r["late_max"] for r in reports), 3),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bauds", default="9600,115200")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per master, plan and round")
    parser.add_argument("--plans", default="n10,sdm630")
    parser.add_argument("--device-on", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--baud", type=int, default=9600, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device_on:
        device_main(args.device_on, args.baud)
        return {}

    all_plans = plans()
    chosen = {name: all_plans[name] for name in args.plans.split(",")}
    result: dict = {"rounds": args.rounds, "seconds": args.seconds, "line": "8N1, turnaround t3.5"}
    with tempfile.TemporaryDirectory(prefix="bench-modbus-wire-") as tmp:
        for baud in (int(b) for b in args.bauds.split(",")):
            with TimedLine(baud) as line:
                device = start_device(line.server_path, baud, Path(tmp))
                try:
                    for plan_name, plan in chosen.items():
                        result[f"{baud}/{plan_name}"] = measure(line, line.client_path, baud, plan_name, plan,
                                                                args.rounds, args.seconds)
                finally:
                    device.stop()

    print()
    print(f"{'baud':>6} {'poll':<7} {'limit tx/s':>10} {'engine tx/s':>11} {'ratio':>6} {'spread':<12} "
          f"{'pymodbus tx/s':>13} {'ratio':>6} {'spread':<12} {'gap engine/pymodbus ms':>22}")
    for key, r in result.items():
        if "/" not in key:
            continue
        baud, plan_name = key.split("/")
        e, p = r["engine"], r["pymodbus"]
        print(f"{baud:>6} {plan_name:<7} {r['limit_tx_per_s']:>10.1f} {e['tx_per_s']:>11.1f} {e['ratio']:>6.3f} "
              f"{e['ratio_min']:.3f}..{e['ratio_max']:.3f} {p['tx_per_s']:>13.1f} {p['ratio']:>6.3f} "
              f"{p['ratio_min']:.3f}..{p['ratio_max']:.3f} "
              f"{e['master_gap_median_ms']:>11.2f}/{p['master_gap_median_ms']:.2f}")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
