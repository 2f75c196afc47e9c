"""The alert rules in deploy/prometheus/ are valid (promtool check rules) and do what their unit tests say
(promtool test rules, one file per alert in deploy/prometheus/tests/): a wrong rule fails CI.

promtool ships in Debian's `prometheus` package (the Makefile's SYSTEM_PACKAGES).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from labkit.prometheus import PROMTOOL

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = DEPLOY / "citynerve-rules.yml"
TESTS = sorted((DEPLOY / "tests").glob("*.yml"))


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=DEPLOY)


def alerts() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), re.M)


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


@pytest.mark.parametrize("test_file", TESTS, ids=[t.stem for t in TESTS])
def test_rule_unit_tests_pass(test_file: Path) -> None:
    result = promtool("test", "rules", test_file)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_test_that_makes_it_fire() -> None:
    """A rule whose test only ever expects silence would pass whatever the expression: each alert needs a test
    case that expects it to fire, with its labels."""
    firing = set()
    for test_file in TESTS:
        text = test_file.read_text()
        assert "  - ../citynerve-rules.yml" in text, f"{test_file.name} does not test the shipped rules file"
        firing |= set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels:", text))
    assert sorted(set(alerts()) - firing) == []
    assert len(alerts()) == len(set(alerts())), "two rules with one name"


def test_a_broken_expectation_fails(tmp_path: Path) -> None:
    """promtool really compares: the same test with the alert expected at the wrong time fails."""
    text = (DEPLOY / "tests" / "collector_down.yml").read_text()
    broken = tmp_path / "collector_down.yml"
    broken.write_text(text.replace("../citynerve-rules.yml", str(RULES)).replace("eval_time: 5m", "eval_time: 3m"))
    result = promtool("test", "rules", broken)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr
