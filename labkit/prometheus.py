"""A real Prometheus server (Debian's `prometheus`) on a free loopback port, in a temp dir, scraping the lab's
programs; and promtool, which ships with it.

    with PrometheusServer({"citynerve-agent": ["127.0.0.1:9108"]}, rule_files=[RULES]) as prom:
        prom.wait_targets_up(timeout=20)
        prom.wait_for('citynerve_agent_device_polls_total{device="meter-a"} > 3', timeout=20)
        value = prom.value('sum(citynerve_agent_messages_acked_total)')

Everything is asked through its HTTP API (/api/v1/query, /api/v1/targets, /api/v1/rules), the way Grafana or an
operator's scripts would: a test sees what Prometheus stored, not what the program printed.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from labkit.process import LabServer, ServerProcess

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


class PrometheusServer(LabServer):
    name = "prometheus"

    def __init__(self, jobs: Mapping[str, Sequence[str]], directory: Path | str | None = None, *,
                 scrape_interval: str = "1s", rule_files: Sequence[Path | str] = (),
                 evaluation_interval: str = "1s", start_timeout: float = 20.0) -> None:
        """jobs: job name -> ["host:port", ...] scraped at /metrics every scrape_interval."""
        super().__init__(directory, start_timeout)
        self.jobs = {job: list(targets) for job, targets in jobs.items()}
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.rule_files = [str(Path(p).resolve()) for p in rule_files]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.scrape_interval, "scrape_timeout": self.scrape_interval,
                       "evaluation_interval": self.evaluation_interval},
            "rule_files": self.rule_files,
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}
                               for job, targets in self.jobs.items()],
        }

    def _new_process(self) -> ServerProcess:
        config = self.directory / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=2))  # JSON is YAML
        argv = [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        return ServerProcess("prometheus", argv, self.log_path, ready=self.ready, start_timeout=self.start_timeout)

    # -- HTTP API -------------------------------------------------------------------------------------------

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=0.5) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def api(self, path: str, **params: str) -> Any:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            doc = json.loads(response.read())
        if doc.get("status") != "success":
            raise RuntimeError(f"Prometheus {path}: {doc}")
        return doc["data"]

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: (labels, value) per series of the result vector."""
        data = self.api("query", query=promql)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(row["metric"], float(row["value"][1])) for row in data["result"]]

    def value(self, promql: str) -> float | None:
        """The value of a query that yields one series (None when it yields none)."""
        rows = self.query(promql)
        if len(rows) > 1:
            raise AssertionError(f"{promql} yields {len(rows)} series: {rows}")
        return rows[0][1] if rows else None

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    # -- waiting for what a test expects, with a deadline ---------------------------------------------------

    def wait_targets_up(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Until every configured target was scraped successfully (health "up")."""
        wanted = sum(len(t) for t in self.jobs.values())

        def all_up() -> list[dict[str, Any]] | None:
            targets = self.targets()
            return targets if len(targets) == wanted and all(t["health"] == "up" for t in targets) else None

        return self._poll(all_up, timeout, lambda: "targets up: " + ", ".join(
            f"{t['scrapeUrl']} {t['health']} {t['lastError']}" for t in self.targets()))

    def wait_for(self, promql: str, timeout: float = 60.0) -> list[tuple[dict[str, str], float]]:
        """Until the query yields at least one series (a comparison such as `x > 0` yields none while false)."""
        return self._poll(lambda: self.query(promql), timeout, lambda: f"{promql} (now: {self.query(promql)})")

    def wait_for_rules(self, predicate: Any, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Until predicate(rules) holds for the loaded rules (e.g. all evaluated without an error)."""
        return self._poll(lambda: (lambda rules: rules if rules and predicate(rules) else None)(self.rules()),
                          timeout, lambda: f"rules: {[(r['name'], r['health'], r.get('lastError')) for r in self.rules()]}")

    def _poll(self, probe: Any, timeout: float, what: Any) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result:
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what()}\n{self.tail_log()}")
            time.sleep(0.2)
