"""`make bench`: every benchmark in one run; each prints its own ratio against a baseline measured with it."""

from __future__ import annotations

from bench import collector_ingest, modbus_engine, modbus_wire, plan_efficiency, seal_cost


def main() -> None:
    print("== collector ingest: mosquitto -> edge-collector -> influxd vs a direct write ==")
    collector_ingest.main([])
    print("== collector ingest, sealed end to end, with the crypto share of the collector's CPU ==")
    collector_ingest.main(["--sealed"])
    print("== seal / open cost per message vs the bare AEAD call ==")
    seal_cost.main([])
    print("== modbus plan efficiency: requests per poll vs the minimum, every bundled profile ==")
    plan_efficiency.main([])
    print("== modbus engine overhead: BusEngine.poll vs a bare pymodbus TCP client, same reads ==")
    modbus_engine.main([])
    print("== modbus wire efficiency: engine transactions/s on a timed serial line vs the line's limit ==")
    modbus_wire.main([])


if __name__ == "__main__":
    main()
