"""The NATS tier's users file at fleet size: what 10, 10,000 and 100,000 gateway users cost the cluster - start-up
until every node is healthy, resident memory per node, a reload (SIGHUP), and a gateway's MQTT connection (TLS
handshake + CONNECT + CONNACK) - with gateways mapped by their certificate's identity URI (what `edge-collector
nats users` writes) against the same users mapped by their subject DN (CN=<gateway id>), the baseline.

    python -m bench.nats_users [--sizes 10,10000,100000] [--connects 20]

The users files are `collector.natsauth.render_users` output: one real enrolled gateway (whose certificate connects)
among N - 1 made-up ones. For the DN variant every user name is rewritten to CN=<gateway id>. The cluster is
labkit/nats.py's: the shipped deploy/nats/ configuration, three nodes on this machine.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import ssl
import statistics
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from collector.natsauth import render_users
from labkit import enrolled
from labkit.nats import NatsCluster
from labkit.outbox_lab import proc_status_kb
from labkit.pki import LabCA
from wire.keys import identity_fingerprint, identity_from_pem

REAL = "gw-real"


def users_text(n: int, real_fingerprint: str, by_dn: bool) -> str:
    gateways = [(REAL, real_fingerprint)] + [
        (f"gw-{i:06d}", hashlib.sha256(f"gw-{i:06d}".encode()).hexdigest()) for i in range(n - 1)]
    text = render_users(gateways, ["collector-1"], prefix="citynerve/v1", stream="CITYNERVE_UP", consumer="collectors")
    if by_dn:  # the same users, named by their certificate's subject instead of its identity URI
        ids = iter(g for g, _ in gateways)
        text = re.sub(r'user: "urn:citynerve:identity:[0-9a-f]+"', lambda _m: f'user: "CN={next(ids)}"', text)
    return text


def connect_ms(cluster: NatsCluster, gw: enrolled.GatewayFiles) -> float:
    done: list[object] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=REAL, protocol=paho.MQTTv311)
    ctx = ssl.create_default_context(cafile=cluster.ca_file)
    ctx.load_cert_chain(str(gw.tls_cert), str(gw.tls_key))
    client.tls_set_context(ctx)
    client.on_connect = lambda _c, _u, _f, reason, _p: done.append(reason)
    start = time.perf_counter()
    client.connect("127.0.0.1", cluster.nodes[1].mqtt_port)
    while not done:
        client.loop(0.005)
    elapsed = time.perf_counter() - start
    client.disconnect()
    if getattr(done[0], "value", 1) != 0:
        raise RuntimeError(f"refused: {done[0]}")
    return elapsed * 1000


def measure(work: Path, deployment: enrolled.Deployment, n: int, by_dn: bool, connects: int) -> dict[str, float]:
    gw = deployment.gateways[REAL]
    fingerprint = identity_fingerprint(identity_from_pem(gw.identity_key.read_bytes()).public_key())
    users = work / f"users-{n}-{'dn' if by_dn else 'uri'}.conf"
    users.write_text(users_text(n, fingerprint, by_dn))
    cluster = NatsCluster(work / f"nats-{n}-{by_dn}", device_ca_dir=deployment.ca_dir,
                          collector_ca_dir=deployment.collector_ca_dir, server_ca=LabCA(work / f"ca-{n}-{by_dn}"),
                          users=users)
    start = time.monotonic()
    cluster.start(timeout=120)
    healthy_s = time.monotonic() - start
    try:
        connect_ms(cluster, gw)  # the account's MQTT streams are made at the first connection
        times = sorted(connect_ms(cluster, gw) for _ in range(connects))
        rss_mb = max(proc_status_kb(node.pid)["VmRSS"] for node in cluster.nodes.values()) / 1024
        node = cluster.nodes[1]
        before = node.log_path.read_text().count("Reloaded server configuration")
        start = time.monotonic()
        node.reload()
        while node.log_path.read_text().count("Reloaded server configuration") == before:
            if time.monotonic() - start > 120:
                raise RuntimeError("no reload within 120 s")
            time.sleep(0.01)
        reload_s = time.monotonic() - start
    finally:
        cluster.close()
    return {"users": n, "mapping": "DN" if by_dn else "URI", "file_mb": round(users.stat().st_size / 1e6, 1),
            "healthy_s": round(healthy_s, 2), "rss_mb": round(rss_mb), "reload_s": round(reload_s, 2),
            "connect_ms_median": round(statistics.median(times), 1), "connect_ms_max": round(times[-1], 1)}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,10000,100000")
    parser.add_argument("--connects", type=int, default=20)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-nats-users-"))
    deployment = enrolled.create(work / "deployment", [REAL])
    results = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            for by_dn in (True, False):
                results.append(measure(work, deployment, n, by_dn, args.connects))
                r = results[-1]
                print(f"{r['users']:>7,} users by {r['mapping']:<3}: file {r['file_mb']} MB, cluster healthy in "
                      f"{r['healthy_s']} s, {r['rss_mb']} MB RSS per node, reload {r['reload_s']} s, MQTT connect "
                      f"{r['connect_ms_median']} ms (median of {args.connects}, max {r['connect_ms_max']})", flush=True)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    for n in sorted({r["users"] for r in results}):
        dn, uri = (next(r for r in results if r["users"] == n and r["mapping"] == m) for m in ("DN", "URI"))
        print(f"{n:>7,} users: connect by URI / by DN = {uri['connect_ms_median'] / dn['connect_ms_median']:.2f}")
    return results


if __name__ == "__main__":
    main()
