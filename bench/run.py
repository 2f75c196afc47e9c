"""`make bench`: every benchmark in one run; each prints its own ratio against a baseline measured with it."""

from __future__ import annotations

from bench import (
    agent_rss,
    backlog_drain,
    collector_ingest,
    dlt645_wire,
    encode,
    flood,
    mbus_parsers,
    modbus_engine,
    modbus_wire,
    nats_scaleout,
    nats_users,
    outbox_fsync,
    plan_efficiency,
    refused_batch,
    seal_cost,
)


def main() -> None:
    print("== collector ingest: mosquitto -> edge-collector -> influxd vs a direct write ==")
    collector_ingest.main([])
    print("== collector ingest, sealed end to end, with the crypto share of the collector's CPU ==")
    collector_ingest.main(["--sealed"])
    print("== line-protocol encoding: readings of floats by JSON vs value by value, same run ==")
    encode.main([])
    print("== seal / open cost per message vs the bare AEAD call ==")
    seal_cost.main([])
    print("== modbus plan efficiency: requests per poll vs the minimum, every bundled profile ==")
    plan_efficiency.main([])
    print("== modbus engine overhead: BusEngine.poll vs a bare pymodbus TCP client, same reads ==")
    modbus_engine.main([])
    print("== modbus wire efficiency: engine transactions/s on a timed serial line vs the line's limit ==")
    modbus_wire.main([])
    print("== DL/T 645 wire efficiency: engine transactions/s on the timed line at 2400 8E1 vs the line's limit ==")
    dlt645_wire.main([])
    print("== outbox fsyncs per poll cycle: the agent under strace vs a naive one-transaction-per-reading outbox ==")
    outbox_fsync.main([])
    print("== agent peak RSS with a 10,000-message backlog vs an empty outbox and the bare imports ==")
    agent_rss.main([])
    print("== backlog drain after a 1-hour outage at 100 points/s vs a direct write of the same points ==")
    backlog_drain.main([])
    print("== flood: gateway B's sample-to-store latency while gateway A floods (valid, garbage, forged) vs B alone ==")
    flood.main([])
    print("== M-Bus parsers: citynerve vs pyMeterBus on libmbus's 76 real telegrams (correctness, decode time) ==")
    mbus_parsers.main([])
    print("== refused batches: one gateway's message refused in each batch vs nothing refused, same run ==")
    refused_batch.main([])
    print("== NATS tier: two collectors on the shared consumer vs one, each capped at 0.25 core ==")
    nats_scaleout.main(["--collector-cpu", "0.25"])
    print("== NATS tier: the users file at 10 / 10,000 / 100,000 gateways, identity URI vs subject DN ==")
    nats_users.main([])


if __name__ == "__main__":
    main()
