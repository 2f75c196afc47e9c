"""collector/audit.py: the hash-chained audit log, and `edge-collector audit verify|show|head`.

Every kind of tampering the issue names (a removed entry, an altered one, the last one removed, reordering)
is done to a real file and must be named by verify(), by line and seq; appends from several processes at
once must leave one intact chain."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from collector import cli as collector_cli
from collector.audit import GENESIS, AuditError, AuditLog, canonical, entry_hash

REPO = Path(__file__).resolve().parent.parent


def command_entry(i: int, gateway: str = "gw-0001") -> dict:
    return {"kind": "command", "gateway": gateway, "device": "pump-3", "point": "setpoint", "value": 20 + i,
            "operators": ["alice"], "state": "done", "readback": 20 + i, "at": f"2025-01-01T00:00:{i:02d}.000Z"}


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    audit = AuditLog(tmp_path / "audit.log")
    for i in range(1, 6):
        audit.append(command_entry(i))
    return audit


def lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines(keepends=True)


def rewrite(log: AuditLog, new_lines: list[bytes]) -> None:
    log.path.write_bytes(b"".join(new_lines))


def one(problems: list[str], *needles: str) -> str:
    """The problems name what happened: at least one mentions every needle."""
    assert problems, "tampering not detected"
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, (needles, problems)
    return hits[0]


# ----------------------------------------------------------------------------------------------- the chain


def test_append_chains_entries_and_keeps_the_head(log):
    entries = log.entries()
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev"] == GENESIS
    for before, after in itertools.pairwise(entries):
        assert after["prev"] == before["hash"]
    for e in entries:
        assert e["hash"] == entry_hash(e)
        assert e["time"].endswith("Z") and e["value"] == 20 + e["seq"]
    assert log.head() == (5, entries[-1]["hash"])
    # the stored line is the canonical JSON (what is hashed, plus the hash)
    assert lines(log)[0] == canonical(entries[0]) + b"\n"
    assert log.verify() == []
    digest = log.append({"kind": "config", "gateway": "gw-0002", "version": 3, "state": "confirmed"})
    assert log.head() == (6, digest) and log.verify() == []


def test_entries_by_gateway_and_limit(log):
    log.append(command_entry(6, "gw-0002"))
    log.append(command_entry(7, "gw-0001"))
    assert [e["seq"] for e in log.entries(gateway="gw-0002")] == [6]
    assert [e["seq"] for e in log.entries(limit=2)] == [6, 7]
    assert [e["seq"] for e in log.entries(gateway="gw-0001", limit=2)] == [5, 7]
    assert AuditLog(log.path.with_name("none.log")).entries() == []


def test_content_may_not_use_the_chains_keys_and_must_be_json(tmp_path):
    audit = AuditLog(tmp_path / "audit.log")
    for bad in ({"seq": 9}, {"hash": "x"}, {"prev": "y", "time": "z"}):
        with pytest.raises(AuditError, match="may not use the key"):
            audit.append(bad)
    with pytest.raises(AuditError, match="not JSON"):
        audit.append({"value": float("nan")})
    with pytest.raises(AuditError, match="not JSON"):
        audit.append({"value": object()})
    assert audit.verify() == [] and audit.entries() == []  # nothing written by a refused append
    audit.append({"text": "Grüße \u2028 \"quoted\"\n"})
    assert audit.entries()[0]["text"] == "Grüße \u2028 \"quoted\"\n" and audit.verify() == []


# ------------------------------------------------------------------------------------------- tampering


def test_a_removed_entry_is_detected(log):
    rewrite(log, [line for i, line in enumerate(lines(log)) if i != 2])  # seq 3
    one(log.verify(), "seq 3 removed", "line 2", "line 3")


def test_several_removed_entries_are_named(log):
    rewrite(log, [lines(log)[0], lines(log)[4]])
    one(log.verify(), "seq 2..4 (3 entries) removed")


def test_the_first_entry_removed_is_detected(log):
    rewrite(log, lines(log)[1:])
    one(log.verify(), "seq 1 removed")


def test_an_altered_entry_is_detected(log):
    ls = lines(log)
    ls[1] = ls[1].replace(b'"value":22', b'"value":99')
    rewrite(log, ls)
    one(log.verify(), "line 2", "seq 2", "altered")


def test_an_altered_entry_with_its_hash_recomputed_breaks_the_next_link(log):
    ls = lines(log)
    entry = json.loads(ls[1])
    entry["operators"] = ["mallory"]
    entry["hash"] = entry_hash(entry)
    ls[1] = canonical(entry) + b"\n"
    rewrite(log, ls)
    problem = one(log.verify(), "line 3", "seq 3", "prev is not the hash of seq 2")
    assert "altered" in problem


def test_the_last_entry_removed_is_detected(log):
    rewrite(log, lines(log)[:-1])
    one(log.verify(), "ends at seq 4", "says seq 5", "last entry was removed")
    rewrite(log, lines(log)[:-2])
    one(log.verify(), "last 3 entries were removed")
    rewrite(log, [])
    one(log.verify(), "every entry was removed")


def test_the_last_entry_replaced_is_detected(log):
    ls = lines(log)
    forged = json.loads(ls[-1])
    forged["value"] = 0
    forged["hash"] = entry_hash(forged)  # a consistent chain, but not the one the head names
    ls[-1] = canonical(forged) + b"\n"
    rewrite(log, ls)
    one(log.verify(), "seq 5 is not the entry", "replaced")


def test_reordering_is_detected(log):
    ls = lines(log)
    ls[1], ls[3] = ls[3], ls[1]
    rewrite(log, ls)
    problems = log.verify()
    one(problems, "reordered")
    assert not any("removed" in p for p in problems), problems  # every entry is still there


def test_a_duplicated_entry_is_detected(log):
    ls = lines(log)
    rewrite(log, [*ls[:3], ls[1], *ls[3:]])
    one(log.verify(), "line 4", "seq 2", "duplicated")


def test_bad_json_and_a_truncated_line_are_named(log):
    ls = lines(log)
    ls[2] = b'{"seq": 3, "broken\n'
    ls[4] = ls[4][:40]  # the last line cut short, without its newline
    rewrite(log, ls)
    problems = log.verify()
    one(problems, "line 3", "bad JSON")
    one(problems, "line 5", "incomplete")
    ls = lines(log)
    ls[0] = b'{"seq":1,"seq":1}\n'
    rewrite(log, ls)
    one(log.verify(), "line 1", "duplicate key")
    rewrite(log, [b"\xff\xfe\n", *ls[1:]])
    one(log.verify(), "line 1", "not UTF-8")


def test_a_missing_or_damaged_head_is_reported(log):
    log.head_path.unlink()
    one(log.verify(), "audit.log.head is missing")
    with pytest.raises(AuditError, match="head is missing"):
        log.append(command_entry(6))  # continuing would make a truncation undetectable
    log.head_path.write_text("nonsense")
    one(log.verify(), "not an audit head")


def test_a_rewrite_of_log_and_head_is_caught_only_by_an_anchor(log, tmp_path):
    """The honest limit (docs/security.md "Audit"): whoever rewrites the log and its head consistently is seen
    only against a head recorded elsewhere."""
    anchor = log.head()
    forged = AuditLog(tmp_path / "forged.log")
    for i in range(1, 6):
        forged.append(command_entry(i) | {"operators": ["mallory"]})
    log.path.write_bytes(forged.path.read_bytes())
    log.head_path.write_bytes(forged.head_path.read_bytes())
    assert log.verify() == []  # consistent in itself
    one(log.verify({anchor[0]: anchor[1]}), "anchor seq 5", "rewritten")
    one(log.verify({9: anchor[1]}), "anchor seq 9", "no such entry")


# ------------------------------------------------------------------------------------------- appending


def test_append_refuses_to_continue_a_log_that_does_not_end_at_its_head(log):
    rewrite(log, lines(log)[:-1])
    before = log.path.read_bytes()
    with pytest.raises(AuditError, match=r"ends at seq 4 but audit\.log\.head says seq 5"):
        log.append(command_entry(6))
    assert log.path.read_bytes() == before  # the evidence is left as it was
    rewrite(log, [])
    with pytest.raises(AuditError, match="has no entry"):
        log.append(command_entry(6))


def test_an_append_interrupted_before_its_head_is_completed_by_the_next(log):
    """A crash between the fsynced line and the head: the log is one ahead of its head; that is not tampering."""
    head = log.head_path.read_bytes()
    log.append(command_entry(6))
    log.head_path.write_bytes(head)  # as if the process died before writing the head
    assert log.verify() == []
    log.append(command_entry(7))
    assert log.head()[0] == 7 and log.verify() == []


def test_a_torn_last_line_is_reported_then_cut_by_the_next_append(log):
    with open(log.path, "ab") as fh:
        fh.write(b'{"seq":6,"kind":"comm')  # a write interrupted before its newline (and before its head)
    one(log.verify(), "line 6", "incomplete")
    log.append(command_entry(6))
    assert [e["seq"] for e in log.entries()] == [1, 2, 3, 4, 5, 6] and log.verify() == []


def test_a_removed_newline_does_not_make_append_cut_a_real_entry(log):
    data = log.path.read_bytes()
    log.path.write_bytes(data[:-1])  # the last entry now looks torn: cutting it would hide its removal
    with pytest.raises(AuditError, match="ends at seq 4"):
        log.append(command_entry(6))
    assert log.path.read_bytes() == data[:-1]


def test_concurrent_appends_from_several_processes(tmp_path):
    path = tmp_path / "audit.log"
    code = ("import sys; from collector.audit import AuditLog\n"
            "log = AuditLog(sys.argv[1])\n"
            "for i in range(40): log.append({'writer': int(sys.argv[2]), 'i': i})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(w)], cwd=REPO) for w in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    log = AuditLog(path)
    assert log.verify() == []
    entries = log.entries()
    assert [e["seq"] for e in entries] == list(range(1, 161))
    for w in range(4):  # each writer's entries are all there, in its own order
        assert [e["i"] for e in entries if e["writer"] == w] == list(range(40))


# ------------------------------------------------------------------------------------------ command line


def test_cli_verify_show_and_head(log, capsys):
    assert collector_cli.main(["audit", "verify", "--log", str(log.path)]) == 0
    out = capsys.readouterr().out
    assert "5 entries, chain intact" in out
    assert collector_cli.main(["audit", "head", "--log", str(log.path)]) == 0
    anchor = capsys.readouterr().out.strip()
    assert anchor == f"5:{log.head()[1]}"
    assert collector_cli.main(["audit", "verify", "--log", str(log.path), "--anchor", anchor]) == 0
    assert "1 anchor(s) found" in capsys.readouterr().out
    log.append(command_entry(6, "gw-0002"))
    assert collector_cli.main(["audit", "show", "--log", str(log.path), "--gateway", "gw-0002", "--json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["seq"] for e in shown] == [6] and shown[0]["gateway"] == "gw-0002"
    assert collector_cli.main(["audit", "show", "--log", str(log.path), "--limit", "2"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert len(text) == 2 and text[1].split()[0] == "6" and "gateway=gw-0002" in text[1] and "value=26" in text[1]
    assert collector_cli.main(["audit", "verify", "--log", str(log.path), "--anchor", "5:nothex"]) == 2
    assert "SEQ:HASH" in capsys.readouterr().err


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collector.cli", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def test_cli_verify_names_each_problem_and_fails(log):
    ls = lines(log)
    ls[1] = ls[1].replace(b'"value":22', b'"value":23')  # altered
    del ls[3]  # seq 4 removed
    del ls[-1]  # the last entry (seq 5) removed
    rewrite(log, ls)
    proc = cli("audit", "verify", "--log", str(log.path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr.splitlines()
    assert any("line 2 (seq 2): altered" in line for line in err), err
    assert any("last 2 entries were removed" in line for line in err), err
    assert err[-1].startswith("error: ") and "problem(s)" in err[-1]
    assert proc.stdout == ""


def test_cli_errors_are_one_line(tmp_path):
    proc = cli("audit", "verify", "--log", str(tmp_path / "missing.log"))
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    toml = tmp_path / "collector.toml"
    toml.write_text('[mqtt]\nhost = "localhost"\n[influx]\nurl = "http://localhost:8086"\ndatabase = "x"\n')
    proc = cli("audit", "show", "-c", str(toml))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "audit_log" in proc.stderr or "collector.toml" in proc.stderr
    proc = cli("audit", "verify")  # neither -c nor --log
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
