"""DL/T 645 wire efficiency: transactions/s of the agent's bus owner (BusEngine.poll of a DL/T 645-2007 meter, its
dialogue through SerialTransport.line()) on the timed serial line of the Modbus wire benchmark
(labkit.serial_lab.TimedLine, here 2400 baud 8E1), divided by the line's limit.

    python -m bench.dlt645_wire [--rounds 3] [--seconds 6] [--baud 2400]

Poll: four identifiers of the 2007 table (energy_import, voltage_l1, current_l1, power: values of 4, 2, 3 and 3
bytes), one request each, as the agent reads them. The meter is labkit.dlt645_sim's MeterBank in a process of its
own on the line's server end; it answers as soon as a request's last byte arrives, and the line holds the answer
until the meter's least reaction time after the request (TURNAROUND_S).

Limit per transaction: the request's and the answer's bytes on the wire (4 FE preamble bytes each way, as the
simulated meter answers), 11 bits per byte at 8E1, plus the reaction time; no gap before the next request (the
standard asks for none). Limit transactions/s = requests per poll / the sum over the poll. Ratio = measured /
limit, the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edge_agent.dlt645 import frames
from edge_agent.dlt645.identifiers import encode_value, table
from edge_agent.meters.config import Dlt645Device
from edge_agent.meters.readers import reader_for
from edge_agent.modbus.bus import BusEngine, PolledDevice
from edge_agent.modbus.config import ModbusBus
from labkit.process import ServerProcess
from labkit.serial_lab import TimedLine

REPO = Path(__file__).resolve().parent.parent
ADDRESS = "000102030425"
IDENTIFIERS = ["energy_import", "voltage_l1", "current_l1", "power"]
# The meter's least reaction time: DL/T 645-2007 lets a meter answer within 20..500 ms of the request (Td), as
# vendor manuals quote it; the simulated meter takes the least.
TURNAROUND_S = 0.020
BITS_PER_BYTE = 11  # start, 8 data, even parity, stop


def limit_per_s(baud: int) -> tuple[float, float]:
    """(limit transactions/s, seconds per poll at the limit) of back-to-back polls of IDENTIFIERS."""
    by_name = table("2007").by_name()
    cycle = 0.0
    for name in IDENTIFIERS:
        ident = by_name[name]
        request = frames.read_request(ADDRESS, ident.code, "2007")
        value = encode_value(ident, 1.0 if ident.name != "power" else 1000.0)
        answer = frames.build(ADDRESS, 0x91, frames.di_bytes(ident.code, "2007") + value)
        cycle += (len(request) + len(answer)) * BITS_PER_BYTE / baud + TURNAROUND_S
    return len(IDENTIFIERS) / cycle, cycle


# --- the meter, in a process of its own ----------------------------------------------------------------------------


def device_main(path: str) -> None:
    """(child process) A DL/T 645-2007 meter on `path`, answering each request the moment its last byte is in."""
    from labkit.dlt645_sim import MeterBank, SimMeter

    bank = MeterBank([SimMeter(ADDRESS)])
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)  # a pty: the timed line keeps the time, not termios
    stop = False

    def end(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, end)
    print("device ready", flush=True)
    while not stop:
        if not select.select([fd], [], [], 0.2)[0]:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:
            return
        answer = bank.answer(data)
        if isinstance(answer, bytes):
            os.write(fd, answer)


def start_device(path: str, work: Path) -> ServerProcess:
    log = work / "device.log"
    argv = [sys.executable, "-m", "bench.dlt645_wire", "--device-on", path]

    def ready() -> bool:
        return log.exists() and "device ready" in log.read_text(errors="replace")

    return ServerProcess("dlt645-device", argv, log, ready, cwd=REPO).start()


# --- the master ----------------------------------------------------------------------------------------------------


async def measure(line: TimedLine, baud: int, rounds: int, seconds: float) -> list[dict]:
    """Every round on one open port (this machine's ptys accept even parity only at the first open)."""
    device = Dlt645Device(id="meter", bus="rs485", address=ADDRESS, identifiers=IDENTIFIERS)  # type: ignore[arg-type]
    polled = PolledDevice("meter", 0, 1.0, [], {}, meter=reader_for(device, baud))
    engine = BusEngine(ModbusBus(id="rs485", target=line.client_path, baud=baud, parity="E"), [polled])
    if not await engine.open_once():
        raise RuntimeError(engine.last_open_error)
    runs = []
    try:
        for _ in range(2):  # warm-up: the first transactions after opening are not timed
            await _poll(engine, polled)
        for _ in range(rounds):
            line.reset()
            polls = 0
            start = time.perf_counter()
            while True:
                await _poll(engine, polled)
                polls += 1
                now = time.perf_counter()
                if now - start >= seconds:
                    break
            report = line.report()
            transactions = polls * len(IDENTIFIERS)
            if report["frames_to_server"] != transactions or report["frames_to_client"] != transactions:
                raise RuntimeError(f"{transactions} transactions timed but the line saw {report['frames_to_server']} "
                                   f"requests and {report['frames_to_client']} answers")
            runs.append({"tx_per_s": transactions / (now - start), "transactions": transactions, "line": report})
    finally:
        await engine.transport.close()
    return runs


async def _poll(engine: BusEngine, device: PolledDevice) -> None:
    outcome = await engine.poll(device)
    if outcome.error or not outcome.readings or len(outcome.readings[0].fields) != len(IDENTIFIERS):
        raise RuntimeError(f"poll failed: {outcome.error or outcome.readings}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baud", type=int, default=2400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="per round")
    parser.add_argument("--device-on", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device_on:
        device_main(args.device_on)
        return {}

    limit, cycle = limit_per_s(args.baud)
    with tempfile.TemporaryDirectory(prefix="bench-dlt645-wire-") as tmp, \
            TimedLine(args.baud, parity="E", turnaround=TURNAROUND_S) as line:
        device = start_device(line.server_path, Path(tmp))
        try:
            runs = asyncio.run(measure(line, args.baud, args.rounds, args.seconds))
        finally:
            device.stop()
    ratios = [r["tx_per_s"] / limit for r in runs]
    reports = [r["line"] for r in runs]
    for i, (run, ratio) in enumerate(zip(runs, ratios, strict=True)):
        rep = run["line"]
        print(f"  round {i + 1}: {run['tx_per_s']:.3f} tx/s, ratio {ratio:.3f}, master gap median "
              f"{1000 * (rep['master_gap_median'] or 0):.2f} ms (t3.5 {1000 * rep['silence']:.2f}), meter delay "
              f"median {1000 * (rep['device_delay_median'] or 0):.2f} ms, line late max "
              f"{1000 * (rep['late_max'] or 0):.3f} ms", flush=True)
    result = {
        "baud": args.baud, "line": "8E1", "identifiers": IDENTIFIERS, "turnaround_ms": 1000 * TURNAROUND_S,
        "limit_tx_per_s": round(limit, 3), "limit_poll_s": round(cycle, 4),
        "tx_per_s": round(statistics.median(r["tx_per_s"] for r in runs), 3),
        "ratio": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "master_gap_median_ms": round(1000 * statistics.median(r["master_gap_median"] for r in reports), 2),
        "silence_ms": round(1000 * reports[0]["silence"], 2),
        "meter_delay_median_ms": round(1000 * statistics.median(r["device_delay_median"] for r in reports), 2),
        "transactions": sum(r["transactions"] for r in runs),
    }
    print(f"\nDL/T 645-2007 at {args.baud} 8E1: limit {limit:.3f} tx/s, engine {result['tx_per_s']:.3f} tx/s, "
          f"ratio {result['ratio']:.3f} ({result['ratio_min']:.3f}..{result['ratio_max']:.3f})")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
