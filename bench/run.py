"""`make bench`: every benchmark in one run; each prints its own ratio against a baseline measured with it."""

from __future__ import annotations

from bench import collector_ingest


def main() -> None:
    print("== collector ingest: mosquitto -> edge-collector -> influxd vs a direct write ==")
    collector_ingest.main([])


if __name__ == "__main__":
    main()
