"""`edge-agent scan --protocol dlt645|cjt188|mbus`: the probes and the M-Bus secondary search, pure against the
simulators' answers, then the command on simulated lines (ptys) as a technician runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edge_agent.mbus import frames as mbus
from edge_agent.meters import scan
from edge_agent.serial.dialogue import Done, Expect, Send
from labkit import mbus_suite
from labkit.cjt188_sim import Cjt188Line, MeterLine
from labkit.cjt188_sim import SimMeter as WaterMeter
from labkit.dlt645_sim import Dlt645Line, MeterBank, SimMeter
from labkit.mbus_sim import MbusLine, MbusMeters
from labkit.mbus_sim import SimMeter as MbusMeter
from labkit.serial_devices import Delayed

ABB_F95 = bytes.fromhex((mbus_suite.SUITE / "abb_f95.hex").read_text())
KAMSTRUP = bytes.fromhex((mbus_suite.SUITE / "kamstrup_multical_601.hex").read_text())


def with_id(telegram: bytes, identification: str) -> bytes:
    """The telegram of another meter of the same make: its identification number (CI 72H header, BCD) replaced."""
    f = mbus.parse(telegram)
    ident = bytes(int(identification[i:i + 2], 16) for i in range(6, -2, -2))
    return mbus.long_frame(f.control, f.address, f.ci, ident + f.data[4:])


def drive(session, answer):  # type: ignore[no-untyped-def]
    """Run a probe against a simulator's pure answer function: what it sends is answered at once, or never."""
    pending = None
    while True:
        step = session.next_step()
        if isinstance(step, Send):
            pending = answer(step.data)
            if isinstance(pending, Delayed):
                pending = pending.data
        elif isinstance(step, Expect):
            if pending:
                session.feed(pending)
                pending = None
            else:
                session.timeout()
        else:
            assert isinstance(step, Done)
            return session.result


def search(meters: MbusMeters, max_probes: int = 400) -> scan.SecondarySearch:
    s = scan.SecondarySearch(max_probes=max_probes)
    while (mask := s.next_mask()) is not None:
        ack = drive(scan.mbus_ack(mbus.select_secondary(mask), 2400), meters.answer)
        if ack.answer is None and not ack.collision:
            s.nothing(mask)
            continue
        who = drive(scan.mbus_identify(mbus.SELECTED, 2400), meters.answer).answer
        if who is not None and who.secondary and mask != who.secondary:  # confirmed as edge-agent scan does
            alone = drive(scan.mbus_ack(mbus.select_secondary(who.secondary), 2400), meters.answer)
            check = drive(scan.mbus_identify(mbus.SELECTED, 2400), meters.answer).answer if alone.answer else None
            who = who if check is not None and check.secondary == who.secondary else None
        if who is not None and who.secondary:
            s.single(mask, who)
        else:
            s.collision(mask)
    return s


def test_dlt645_read_address_alone_and_in_a_crowd() -> None:
    alone = drive(scan.dlt645_read_address(2400), MeterBank([SimMeter("000102030425")]).answer)
    assert alone.answer == "000102030425" and not alone.garbled
    crowd = drive(scan.dlt645_read_address(2400), MeterBank([SimMeter("000102030425"), SimMeter("000102030426")]).answer)
    assert crowd.answer is None and crowd.collision  # two answers at once: garbled, never a made-up address
    old = drive(scan.dlt645_read_address(2400), MeterBank([SimMeter("12", edition="1997")]).answer)
    assert old.answer is None and not old.collision  # a 1997 meter does not know 13H
    wildcard = drive(scan.dlt645_read("AAAAAAAAAAAA", "1997", 2400), MeterBank([SimMeter("12", edition="1997")]).answer)
    assert wildcard.answer == "000000000012"
    missing = SimMeter("000000000007", edition="1997", omit={"energy_import"})
    abnormal = drive(scan.dlt645_read("000000000007", "1997", 2400), MeterBank([missing]).answer)
    assert abnormal.answer == "000000000007"  # "no such data" is an answer: a meter is there


def test_cjt188_wildcard_read() -> None:
    line = MeterLine([WaterMeter(0x10, "11111111111111"), WaterMeter(0x20, "33")])
    assert drive(scan.cjt188_read(0x20, 2400), line.answer).answer == ("00000000000033", 0x20)
    assert drive(scan.cjt188_read(0x30, 2400), line.answer).answer is None
    two = MeterLine([WaterMeter(0x10, "11111111111111"), WaterMeter(0x10, "22")])
    assert drive(scan.cjt188_read(0x10, 2400), two.answer).collision


def test_secondary_search_narrows_collisions_digit_by_digit() -> None:
    ids = ["12345678", "12349999", "55555555"]
    meters = MbusMeters([MbusMeter(0, [with_id(ABB_F95, i)]) for i in ids] + [MbusMeter(3, [KAMSTRUP])])
    s = search(meters)
    kamstrup = mbus.parse(KAMSTRUP)
    from edge_agent.mbus import records

    kamstrup_id = records.parse_header(kamstrup.ci, kamstrup.data)[0].identification
    assert sorted(m.secondary[:8] for m in s.found) == sorted([*ids, kamstrup_id])
    assert all(m.manufacturer for m in s.found) and not s.unresolved and not s.left
    # the root, then ten digits at each position the colliding 1234.... pair shares, and the first one
    assert s.probes <= 1 + 10 * 5 + 10, s.probes
    bounded = search(MbusMeters([MbusMeter(0, [with_id(ABB_F95, i)]) for i in ids]), max_probes=5)
    # root, 0 (nobody), 1 (the pair collides again), 10, 11: then the bound; 12.. and 2..9 are left, in order
    assert bounded.probes == 5 and bounded.left[:2] == ["12FFFFFFFFFFFFFF", "13FFFFFFFFFFFFFF"]
    assert bounded.left[-1] == "9FFFFFFFFFFFFFFF"


def test_one_meter_is_found_with_one_selection_and_twins_are_reported() -> None:
    s = search(MbusMeters([MbusMeter(9, [ABB_F95])]))
    assert s.probes == 1 and len(s.found) == 1 and s.found[0].primary == 9
    other_reading = bytearray(mbus.parse(ABB_F95).data)
    other_reading[20] ^= 0x0F  # the same meter's make and identification, another value in its first record
    twin = mbus.long_frame(0x08, 0, 0x72, bytes(other_reading))
    twins = search(MbusMeters([MbusMeter(1, [ABB_F95]), MbusMeter(2, [twin])]))
    assert not twins.found and twins.unresolved == [twins.unresolved[0]] and twins.unresolved[0][:8].isdigit()


# -- the command -----------------------------------------------------------------------------------------------


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", "scan", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.integration
def test_scan_dlt645_by_broadcast_wildcard_and_addresses() -> None:
    line = Dlt645Line([SimMeter("000102030425"), SimMeter("000000000012", edition="1997")])
    try:
        result = agent("--protocol", "dlt645", "--target", line.device, "--addresses", "000000000012,000000000077")
    finally:
        line.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"dlt645 000102030425  {line.device} 2400 8E1  [DL/T 645-2007, answered the read-address request]",
        f"dlt645 000000000012  {line.device} 2400 8E1  [DL/T 645-1997, answered a read to the wildcard address]",
    ]
    err = result.stderr
    assert "tried: read-address request (13H) to AAAAAAAAAAAA, DL/T 645-2007 §7.1: answered by 000102030425" in err
    assert "tried: 2 address(es) probed with a read of the total energy (2007, then 1997): 1 answered" in err
    # read address and its confirmation, the 1997 wildcard read and its confirmation, 000000000012 in 2007 then
    # 1997, 000000000077 in both: 8 requests
    assert "scan: 8 request(s) in" in err


@pytest.mark.integration
def test_scan_mbus_primary_and_secondary() -> None:
    first, second = mbus.parse(ABB_F95), mbus.parse(KAMSTRUP)
    assert first and second

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        # a line of its own for each run: this machine's ptys refuse even parity once they were opened with it
        line = MbusLine([MbusMeter(3, [with_id(ABB_F95, "12345678")]), MbusMeter(5, [with_id(ABB_F95, "55555555")])])
        try:
            result = agent("--protocol", "mbus", "--target", line.device, *args, "--timeout", "0.1")
        finally:
            line.close()
        return subprocess.CompletedProcess(result.args, result.returncode,
                                           result.stdout.replace(line.device, "PTY"), result.stderr)

    primary = run("--addresses", "0-6")
    secondary = run("--secondary")
    empty = run("--addresses", "7-8")
    assert primary.returncode == 0, primary.stderr
    assert primary.stdout.splitlines() == [
        f"mbus 3  PTY 2400 8E1  [secondary address 12345678{first.data[5]:02X}{first.data[4]:02X}"
        f"{first.data[6]:02X}{first.data[7]:02X}, HYD, heat (outlet)]",
        f"mbus 5  PTY 2400 8E1  [secondary address 55555555{first.data[5]:02X}{first.data[4]:02X}"
        f"{first.data[6]:02X}{first.data[7]:02X}, HYD, heat (outlet)]",
    ], primary.stdout
    assert "tried: SND_NKE to primary address(es) 0..6 (7), REQ_UD2 where acknowledged: 2 answered" in primary.stderr
    assert secondary.returncode == 0, secondary.stderr
    found = secondary.stdout.splitlines()
    assert [f.split()[1][:8] for f in found] == ["12345678", "55555555"], found
    assert "primary address 3" in found[0]
    # the root selection collides; the first digit tells them apart: 11 selections
    assert "by wildcard narrowing (EN 13757-3 §11.3): 11 selection(s), 2 meter(s) found" in secondary.stderr
    assert empty.returncode == 1 and "no mbus meter answered on" in empty.stderr


@pytest.mark.integration
def test_scan_cjt188_wildcard_and_bad_arguments() -> None:
    line = Cjt188Line([WaterMeter(0x10, "11111111111111"), WaterMeter(0x20, "33")])
    try:
        result = agent("--protocol", "cjt188", "--target", line.device, "--meter-type", "cold_water",
                       "--meter-type", "heat", "--meter-type", "gas")
    finally:
        line.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"cjt188 11111111111111  {line.device} 2400 8E1  [cold_water (10H), answered the wildcard address]",
        f"cjt188 00000000000033  {line.device} 2400 8E1  [heat (20H), answered the wildcard address]",
    ]
    assert "10H answered by 11111111111111; 20H answered by 00000000000033" in result.stderr
    for args, message in (
        (["--protocol", "dlt645", "--target", "tcp://127.0.0.1:502"], "--protocol dlt645: scans a serial port"),
        (["--protocol", "dlt645", "--target", "/dev/null", "--addresses", "12345"],
         '--addresses: "12345" is not a DL/T 645 address'),
        (["--protocol", "mbus", "--target", "/dev/null", "--addresses", "0-251"], "primary addresses are 0..250"),
        (["--protocol", "cjt188", "--target", "/dev/null", "--meter-type", "water"],
         "--meter-type water: expected one of cold_water"),
        (["--protocol", "dlt645", "--target", "/dev/ttyDOESNOTEXIST"], "serial port /dev/ttyDOESNOTEXIST does not exist"),
    ):
        bad = agent(*args)
        assert bad.returncode in (1, 2) and message in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)
