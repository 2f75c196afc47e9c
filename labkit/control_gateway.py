"""A gateway's control side for the collector's relay tests, where the real agent cannot be used: a hostile
gateway (its own TLS certificate and identity key, sealing like the agent with wire.seal.GatewaySealer,
verifying what comes on down/control with wire.control.Trust, answering with whatever sealed reports a test
wants), or a gateway that loses a downlink on purpose. labkit/control_lab.py's ControlLab is the opposite
stand-in: a collector for the agent's tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from labkit import enrolled
from labkit.secure_broker import SecureBroker, TestClient
from wire import control, topics
from wire.keys import collector_key_from_pem, identity_from_pem, public_identity_from_file
from wire.schema import Batch, Reading, encode_batch
from wire.seal import GatewaySealer


class ControlGateway:
    """A gateway's control side on the real broker (see the module's docstring). `answer(doc, operators)`
    decides the reports for an accepted document; refusals by Trust are reported with their reason code."""

    def __init__(self, broker: SecureBroker, deployment: enrolled.Deployment, gateway: str, operator_ca: Path,
                 prefix: str = topics.DEFAULT_PREFIX) -> None:
        gw = deployment.gateways[gateway]
        self.gateway = gateway
        self.prefix = prefix
        self.up = topics.up(prefix, gateway)
        self.report_topic = topics.report(prefix, gateway)
        self.down = topics.down(prefix, gateway, control.KIND)
        self.sealer = GatewaySealer(gateway, identity_from_pem(gw.identity_key.read_bytes()),
                                    collector_key_from_pem(deployment.collector_pub.read_bytes()))
        self.trust = control.Trust(public_identity_from_file(operator_ca))
        self.client = TestClient(broker.port, broker.ca_file, gw.tls_cert, gw.tls_key, client_id=gateway)
        outcome = self.client.connect()
        assert outcome == "connected", outcome
        self.client.subscribe(self.down)
        self.seq = 0
        self.seen: list[control.SignedDoc] = []  # every document that arrived, in order (re-sends too)
        self.refusals: list[control.ControlRefused] = []
        self._handled = 0

    def uplink(self) -> None:
        """One sealed reading: the collector verifies this gateway's session (downlinks need one)."""
        self.seq += 1
        body = encode_batch(Batch(self.gateway, self.seq, time.time_ns(),
                                  [Reading("ctl-probe", "ctl_probe", time.time_ns(), {"n": float(self.seq)})]))
        self.client.publish(self.up, self.sealer.seal(self.up, body))

    def report(self, report: control.Report) -> int:
        return self.client.publish(self.report_topic, self.sealer.seal(self.report_topic, control.encode(report)))

    def pump(self, answer: Callable[[control.Command | control.ConfigDoc, list[control.OperatorCert]],
                                    list[control.Report]]) -> int:
        """Handle the downlinks that arrived since the last call; how many."""
        messages = self.client.messages[self._handled:]
        self._handled += len(messages)
        for message in messages:
            if not topics.is_own_topic(self.down, message.topic):
                continue
            down = control.decode_down(self.sealer.open_confidential(self.down, message.payload))
            now = int(time.time() * 1000)
            self.trust.offer_crl(down.crl, now)
            if down.item is None:
                continue
            self.seen.append(down.item)
            doc = control.read_doc(down.item)
            kind = down.item.kind
            ref = doc.id if isinstance(doc, control.Command) else str(doc.version)
            try:
                doc, operators = self.trust.verify(down.item, gateway=self.gateway, now_ms=now)
            except control.ControlRefused as exc:
                self.refusals.append(exc)
                self.report(control.Report(kind, ref, "refused", now, str(exc.reason), exc.detail))
                continue
            for report in answer(doc, operators):
                self.report(report)
        return len(messages)

    def close(self) -> None:
        self.client.close()
