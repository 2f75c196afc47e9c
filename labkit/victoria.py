"""A real VictoriaMetrics (single node, Debian's victoria-metrics) on a free loopback port, in a temp dir.

It accepts InfluxDB line protocol on /write (1.x API, ?db=) and /api/v2/write (?org=&bucket=), gzip or not,
and stores it Prometheus-style. How a line becomes samples (v1.79, default flags):

    power,phase=L1,site=a w=1.5,ok=true,count=3i,note="x" 1700000000123456789
      -> power_w{phase="L1",site="a"}      1.5  @ 1700000000123 ms
         power_ok{phase="L1",site="a"}     1.0  @ ...            (booleans become 1 / 0)
         power_count{phase="L1",site="a"}  3.0  @ ...            (integers become floats)
         power_note{...}                   0.0  @ ...            (strings are not stored as text)

- metric name = "{measurement}_{field}" (-influxMeasurementFieldSeparator), tags become labels;
- /write?db=NAME adds the label db="NAME" (-influxDBLabel); /api/v2/write adds no label for org/bucket;
- timestamps are cut to milliseconds (-influxTrimTimestamp=1ms), so two points 1 µs apart collide;
- no deduplication by default: writing the same point twice stores two samples with equal timestamps;
- a line it cannot parse is logged and skipped, and the request still answers 204: a 204 from
  VictoriaMetrics does not mean every line was stored;
- lines are split on every newline, even inside a quoted string value;
- in tag keys/values and field keys "\\\\" becomes "\\" (InfluxDB keeps both backslashes);
- samples outside the retention (default: the last month) or too far in the future are dropped silently.

Reading back: a write becomes visible to /api/v1/export about a second later, even after
/internal/force_flush (it flushes the storage, not the ingestion buffers in front of it), so export_samples()
polls until the expected number of samples is there.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from labkit.process import LabServer, ServerProcess

VICTORIA_METRICS = shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"


@dataclass(frozen=True)
class Sample:
    name: str  # the metric name: measurement_field
    labels: dict[str, str]  # without __name__
    value: float
    timestamp_ms: int


class VictoriaMetricsServer(LabServer):
    name = "victoria-metrics"

    def __init__(
        self,
        directory: Path | str | None = None,
        *,
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 10.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(directory, start_timeout)
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})  # added to the process's environment (GOGC: see docs/benchmarks.md "Store")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _new_process(self) -> ServerProcess:
        argv = [
            VICTORIA_METRICS,
            f"-storageDataPath={self.directory / 'data'}",
            f"-httpListenAddr=127.0.0.1:{self.port}",
            "-search.disableCache",
            "-loggerLevel=INFO",
            *self.extra_args,
        ]
        return ServerProcess(
            "victoria-metrics", argv, self.log_path, ready=self.healthy, start_timeout=self.start_timeout,
            env=self.env or None,
        )

    # -- HTTP helpers ---------------------------------------------------------------------------------------

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=0.5) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def force_flush(self) -> None:
        self._get("/internal/force_flush", {})

    def export(self, match: str = '{__name__!=""}') -> list[Sample]:
        """One look at what is stored now (see the module note on visibility), by name, labels and time."""
        self.force_flush()
        data = self._get("/api/v1/export", {"match[]": match})
        samples: list[Sample] = []
        for line in data.splitlines():
            if not line.strip():
                continue
            series = json.loads(line)
            labels = dict(series["metric"])
            name = labels.pop("__name__", "")
            for value, ts in zip(series["values"], series["timestamps"], strict=True):
                samples.append(Sample(name, labels, float(value), int(ts)))
        samples.sort(key=lambda s: (s.name, sorted(s.labels.items()), s.timestamp_ms))
        return samples

    def export_samples(
        self, match: str = '{__name__!=""}', *, expect: int, timeout: float = 10.0
    ) -> list[Sample]:
        """Poll export() until at least `expect` samples match (or the timeout passes), then return them."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.export(match)
            if len(samples) >= expect or time.monotonic() >= deadline:
                return samples
            time.sleep(0.1)

    def write(self, body: bytes | str, db: str | None = None) -> None:
        query = "?" + urllib.parse.urlencode({"db": db}) if db else ""
        request = urllib.request.Request(
            f"{self.url}/write{query}", data=body.encode() if isinstance(body, str) else body, method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def _get(self, path: str, params: dict[str, str]) -> bytes:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=30) as response:
            return response.read()
