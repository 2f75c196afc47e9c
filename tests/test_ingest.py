"""The collector's pure pipeline: topic + payload + receive time -> line protocol or a typed rejection."""

from __future__ import annotations

import pytest

from collector.ingest import Ingest, TimePolicy
from wire.envelope import Rejection, WireError, seal_plain
from wire.schema import Batch, Reading

NOW = 1_800_000_000_000_000_000
ingest = Ingest("citynerve/v1", 10_000, TimePolicy(300 * 10**9, 1_577_836_800 * 10**9), "suspect")


def lines_of(batch: Batch, topic: str = "citynerve/v1/gw-1/up") -> list[bytes]:
    return ingest.uplink(topic, seal_plain(batch), NOW).lines


def test_tags_fields_time_and_ingest_record() -> None:
    reading = Reading("meter 1", "electricity", NOW - 5, {"v": 230.5, "n": 3}, {"model": "SDM630", "device": "forged"})
    accepted = ingest.uplink("citynerve/v1/gw-1/up", seal_plain(Batch("gw-1", 7, NOW - 2, [reading])), NOW)
    assert (accepted.gateway, accepted.seq, accepted.sealed, accepted.session_id) == ("gw-1", 7, False, None)
    lines = accepted.lines
    assert lines[0] == b"electricity,device=meter\\ 1,gateway=gw-1,model=SDM630 v=230.5,n=3i " + str(NOW - 5).encode()
    assert lines[1].startswith(b"citynerve_ingest,gateway=gw-1 seq=7i,readings=1i,suspect=0i,")
    assert lines[1].endswith(str(NOW - 2).encode())
    assert b"latency_ms=2e-06 " in lines[1]


def test_the_ingest_record_of_a_message_sent_with_the_clock_unset_has_no_latency() -> None:
    """A send time of 1970 (a gateway without RTC before NTP) gives no "latency" of decades to the dashboards:
    the record is stamped at arrival and says what it knows."""
    reading = Reading("m", "e", 2_000, {"v": 1.0})
    record = ingest.uplink("citynerve/v1/gw-1/up", seal_plain(Batch("gw-1", 3, 1_000, [reading])), NOW).lines[-1]
    assert record == (b"citynerve_ingest,gateway=gw-1 seq=3i,readings=1i,suspect=1i,declined=0i,received_ns=%di %d"
                      % (NOW, NOW))


def test_quality_flags_are_stored_beside_the_missing_value() -> None:
    reading = Reading("m", "inverter", NOW, {"w": 1200.0}, {}, {"va": "not_available", "hz": "error"})
    (line, _) = lines_of(Batch("gw-1", 1, NOW, [reading]))
    assert line == b'inverter,device=m,gateway=gw-1 w=1200.0,va_quality="not_available",hz_quality="error" ' + str(NOW).encode()
    only_flags = Reading("m", "inverter", NOW, {}, {}, {"va": "not_available"})
    assert lines_of(Batch("gw-1", 2, NOW, [only_flags]))[0].startswith(b'inverter,device=m,gateway=gw-1 va_quality="not_available" ')


def test_implausible_times_go_to_the_suspect_measurement() -> None:
    early = Reading("m", "e", 1_000, {"v": 1.0})
    future = Reading("m", "e", NOW + 301 * 10**9, {"v": 2.0})
    accepted = ingest.uplink("citynerve/v1/gw-1/up", seal_plain(Batch("gw-1", 1, NOW, [early, future])), NOW)
    assert accepted.suspect == 2
    assert accepted.lines[0] == b"suspect,device=m,gateway=gw-1,measurement=e v=1.0,sample_time_ns=1000i " + str(NOW).encode()
    assert accepted.lines[1].endswith(str(NOW + 1).encode())


def test_a_gateway_without_rtc_flags_what_it_could_not_correct_and_it_is_set_aside() -> None:
    """edge_agent/clock.py: an earlier boot's readings whose offset was never learned carry time=uncorrectable;
    their time may look plausible (fake-hwclock's last shutdown) and is still not used. Corrected ones are
    stored at their time with the flag beside the values."""
    recent = NOW - 3 * 86400 * 10**9
    uncorrectable = Reading("m", "e", recent, {"v": 1.0}, {}, {"time": "uncorrectable"})
    corrected = Reading("m", "e", recent, {"v": 2.0}, {}, {"time": "corrected_ntp"})
    accepted = ingest.uplink("citynerve/v1/gw-1/up", seal_plain(Batch("gw-1", 1, NOW, [uncorrectable, corrected])),
                             NOW)
    assert accepted.suspect == 1
    assert accepted.lines[0] == (b'suspect,device=m,gateway=gw-1,measurement=e v=1.0,time_quality="uncorrectable",'
                                 b'sample_time_ns=' + str(recent).encode() + b"i " + str(NOW).encode())
    assert accepted.lines[1] == b'e,device=m,gateway=gw-1 v=2.0,time_quality="corrected_ntp" ' + str(recent).encode()


def test_reading_without_a_storable_field_is_skipped_and_counted() -> None:
    nan = Reading("m", "e", NOW, {"v": float("nan")})
    accepted = ingest.uplink("citynerve/v1/gw-1/up", seal_plain(Batch("gw-1", 1, NOW, [nan])), NOW)
    assert accepted.skipped == 1 and len(accepted.lines) == 1  # only the ingest record


@pytest.mark.parametrize(
    "topic, payload, reason",
    [
        ("citynerve/v1/gw-1/up", b"\x01" + b"\x00" * 20_000, Rejection.TOO_LARGE),
        ("citynerve/v1/gw-1/status", seal_plain(Batch("gw-1", 1, NOW, [])), Rejection.BAD_TOPIC),
        ("elsewhere/gw-1/up", seal_plain(Batch("gw-1", 1, NOW, [])), Rejection.BAD_TOPIC),
        ("citynerve/v1/gw-2/up", seal_plain(Batch("gw-1", 1, NOW, [])), Rejection.TOPIC_MISMATCH),
    ],
)
def test_rejections(topic: str, payload: bytes, reason: Rejection) -> None:
    with pytest.raises(WireError) as exc:
        ingest.uplink(topic, payload, NOW)
    assert exc.value.reason == reason


def _sealed_setup():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from wire.seal import CollectorKey, GatewaySealer, Opener

    identity = Ed25519PrivateKey.generate()
    collector_key = CollectorKey.generate()
    registry = {"gw-1": identity.public_key()}
    opener = Opener([collector_key], registry.get)
    sealer = GatewaySealer("gw-1", identity, collector_key.public_only())
    sealed_ingest = Ingest("citynerve/v1", 10_000, TimePolicy(300 * 10**9, 1_577_836_800 * 10**9), "suspect",
                           opener, accept_plain=False)
    return sealer, sealed_ingest


def test_sealed_payloads_are_opened_and_duplicates_flagged() -> None:
    from wire.schema import encode_batch

    sealer, sealed_ingest = _sealed_setup()
    topic = "citynerve/v1/gw-1/up"
    payload = sealer.seal(topic, encode_batch(Batch("gw-1", 5, NOW, [Reading("m", "e", NOW, {"v": 1.5})])))
    first = sealed_ingest.uplink(topic, payload, NOW)
    assert first.sealed and not first.duplicate and first.lines[0].startswith(b"e,device=m,gateway=gw-1 v=1.5 ")
    assert first.session_id == sealer.session_id  # whose downlink key authenticates the acknowledgement
    again = sealed_ingest.uplink(topic, payload, NOW)
    assert again.duplicate and again.lines == first.lines  # stored again: the same point, idempotent
    assert again.seq == 5 and again.session_id == sealer.session_id  # and acknowledged again


def test_sealed_collector_refuses_plain_and_checks_the_batch_gateway() -> None:
    from wire.schema import encode_batch

    sealer, sealed_ingest = _sealed_setup()
    with pytest.raises(WireError) as exc:
        sealed_ingest.uplink("citynerve/v1/gw-1/up", seal_plain(Batch("gw-1", 1, NOW, [])), NOW)
    assert exc.value.reason == Rejection.UNSEALED
    # a gateway that seals a batch claiming to be another gateway: the sealed header is right, the batch lies
    topic = "citynerve/v1/gw-1/up"
    lie = sealer.seal(topic, encode_batch(Batch("gw-2", 1, NOW, [])))
    with pytest.raises(WireError) as exc:
        sealed_ingest.uplink(topic, lie, NOW)
    assert exc.value.reason == Rejection.TOPIC_MISMATCH
    moved = sealer.seal(topic, encode_batch(Batch("gw-1", 2, NOW, [])))
    with pytest.raises(WireError) as exc:
        sealed_ingest.uplink("citynerve/v1/gw-2/up", moved, NOW)
    assert exc.value.reason == "topic_mismatch"


def test_random_and_mutated_payloads_end_in_a_typed_rejection() -> None:
    """Anything arriving on an uplink topic ends in a WireError with a reason code, never another exception."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from wire.envelope import Rejection
    from wire.schema import encode_batch
    from wire.seal import SealReason

    sealer, sealed_ingest = _sealed_setup()
    topic = "citynerve/v1/gw-1/up"
    genuine = sealer.seal(topic, encode_batch(Batch("gw-1", 1, NOW, [Reading("m", "e", NOW, {"v": 1.0})])))
    reasons = {str(r) for r in Rejection} | {str(r) for r in SealReason}

    @settings(max_examples=400, deadline=None)
    @given(st.one_of(
        st.binary(max_size=400),
        st.builds(lambda cut: genuine[:cut], st.integers(0, len(genuine) - 1)),
        st.builds(lambda i, b: genuine[:i] + bytes([b]) + genuine[i + 1:], st.integers(0, len(genuine) - 1),
                  st.integers(0, 255)),
    ))
    def check(payload: bytes) -> None:
        try:
            sealed_ingest.uplink(topic, payload, NOW)
        except WireError as exc:
            assert str(exc.reason) in reasons
        else:
            assert payload == genuine  # only the untouched message (a duplicate by now) is accepted

    check()


# -- health heartbeat (collector/health.py) ------------------------------------------------------------------

POLICY = TimePolicy(300 * 10**9, 1_577_836_800 * 10**9)


def _status(doc: dict) -> object:
    import json

    from wire.status import decode_status

    return decode_status(json.dumps(doc).encode())


def test_heartbeat_fields_time_and_devices() -> None:
    from collector.health import health_lines

    doc = {"state": "online", "gateway": "gw-1", "time_ns": NOW - 10, "version": "0.2.0", "mqtt": "5",
           "since_ns": NOW - 10**12, "backlog_messages": 3, "backlog_oldest_ns": None, "resent_messages": 2,
           "unknown_new_field": {"a newer agent": [1, 2]},
           "devices": {"meter 1": {"polls": 10, "errors": 2, "last_error": 'bad "crc"\nagain'},
                       "m2": {"polls": 4, "errors": 0, "last_error": None}}}
    health = health_lines(_status(doc), "gw-1", NOW, POLICY)
    assert health.skipped_devices == 0
    assert health.lines == [
        # null and fields not in the schema are left out
        b"citynerve_gateway_health,gateway=gw-1 online=1i,since_ns=%di,backlog_messages=3i,"
        b"resent_messages=2i %d" % (NOW - 10**12, NOW - 10),
        b'citynerve_device_health,device=meter\\ 1,gateway=gw-1 polls=10i,errors=2i,last_error="bad \\"crc\\" again" '
        + str(NOW - 10).encode(),
        b"citynerve_device_health,device=m2,gateway=gw-1 polls=4i,errors=0i " + str(NOW - 10).encode(),
    ]


@pytest.mark.parametrize("doc, age", [
    ({"time_ns": NOW, "backlog_messages": 4, "backlog_oldest_ns": NOW - 2_500_000_000}, b"backlog_age_s=2.5"),
    ({"time_ns": NOW, "backlog_messages": 0}, b"backlog_age_s=0.0"),
    # the gateway's two clocks disagree by a step (NTP) between the two readings: never a negative age
    ({"time_ns": NOW, "backlog_messages": 1, "backlog_oldest_ns": NOW + 10**9}, b"backlog_age_s=0.0"),
    # a heartbeat that does not tell (an older agent, the last will)
    ({"time_ns": NOW, "backlog_messages": 3}, None),
    ({"backlog_messages": 3, "backlog_oldest_ns": NOW - 10**9}, None),
])
def test_heartbeat_backlog_age_is_measured_on_the_gateways_own_clock(doc: dict, age: bytes | None) -> None:
    from collector.health import health_lines

    line = health_lines(_status({"state": "online", **doc}), "gw-1", NOW, POLICY).lines[0]
    fields = line.split(b" ")[1].split(b",")
    assert [f for f in fields if f.startswith(b"backlog_age_s=")] == ([age] if age else [])


@pytest.mark.parametrize("time_ns", [None, 12_345, NOW + 301 * 10**9, NOW - 46 * 86400 * 10**9])
def test_heartbeat_without_a_plausible_time_is_stored_at_its_arrival(time_ns: object) -> None:
    from collector.health import health_lines

    policy = TimePolicy(300 * 10**9, 1_577_836_800 * 10**9, 45 * 86400 * 10**9)
    doc = {"state": "offline", "time_ns": time_ns}
    assert health_lines(_status(doc), "gw-1", NOW, policy).lines == [
        b"citynerve_gateway_health,gateway=gw-1 online=0i " + str(NOW).encode()]


@pytest.mark.parametrize("doc, what", [
    ({"state": "online", "time_ns": "1800000000000000000"}, "time_ns"),
    ({"state": "online", "time_ns": 1.8e18}, "time_ns"),
    ({"state": "online", "time_ns": True}, "time_ns"),
    ({"state": "online", "backlog_messages": -1}, "backlog_messages"),
    ({"state": "online", "next_seq": 2**63}, "next_seq"),
    ({"state": "online", "outbox_resets": True}, "outbox_resets"),
    ({"state": "sleeping"}, "state"),
    ({"state": "online", "gateway": "gw/1"}, "gateway"),
    ({"state": "online", "devices": 3}, "devices"),
    ({"state": "online", "devices": {"m": [1, 2]}}, "devices"),
    ({"state": "online", "devices": {"": {"polls": 1}}}, "devices"),
    ({"state": "online", "devices": {"x" * 129: {"polls": 1}}}, "devices"),
    ({"state": "online", "devices": {f"d{i}": {} for i in range(1001)}}, "devices"),
    ({"state": "online", "devices": {"m": {"last_error": "x" * 1025}}}, "last_error"),
])
def test_a_status_outside_the_schema_is_refused_naming_the_key(doc: dict, what: str) -> None:
    from wire.status import StatusError

    with pytest.raises(StatusError, match=what):
        _status(doc)


@pytest.mark.parametrize("payload, what", [
    (b"[" * 200_000 + b"]" * 200_000, "bytes > limit"),
    (b'{"state":"online","x":' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply|bytes > limit"),
    (b'{"state":"online","x":' + b"[" * 20_000 + b"]" * 20_000 + b"}", "nested too deeply"),
    (b'{"state":"online","version":"\xff"}', "invalid|malformed|utf-8|UTF-8"),
    (rb'{"state":"online","version":"\udc80","devices":{"\udc80":{"polls":1}}}', ""),
    (b"\xff\xfe", "malformed|invalid"),
    (b"", "truncated|malformed|Input data"),
])
def test_huge_deep_or_broken_status_documents_are_a_status_error_never_an_exception(payload: bytes, what: str) -> None:
    from wire.status import StatusError, decode_status

    try:
        decode_status(payload)
    except StatusError as exc:
        assert not what or __import__("re").search(what, str(exc)), str(exc)


def test_heartbeat_device_entries_are_bounded_and_unstorable_ones_skipped() -> None:
    from collector.health import health_lines

    health = health_lines(_status({"state": "online", "devices": {"ends\\": {"polls": 1}, "no-fields": {},
                                                                 "ok": {"polls": 1}}}), "gw-1", NOW, POLICY)
    assert health.skipped_devices == 2
    assert [line.split(b" ")[0] for line in health.lines[1:]] == [b"citynerve_device_health,device=ok,gateway=gw-1"]
    # devices over the gateway's budget (collector/guard.py) are left out and counted
    doc = _status({"state": "online", "devices": {f"d{i}": {"polls": i} for i in range(5)}})
    health = health_lines(doc, "gw-1", NOW, POLICY, devices_allowed=["d0", "d3"])
    assert len(health.lines) == 3 and health.skipped_devices == 3


def test_any_status_document_gives_lines_or_a_status_error_never_an_exception() -> None:
    import json

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from collector.health import health_lines
    from wire.status import StatusError, decode_status

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=20,
    )
    keys = st.sampled_from(["state", "time_ns", "backlog_messages", "since_ns", "devices", "gateway", "other"])

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(keys | st.text(max_size=8), json_values, max_size=8),
           st.dictionaries(st.text(max_size=12), json_values | st.fixed_dictionaries(
               {"polls": json_values, "errors": json_values, "last_error": json_values}), max_size=5),
           st.sampled_from(["online", "offline"]))
    def check(doc: dict, devices: dict, state: str) -> None:
        payload = json.dumps({**doc, "devices": devices, "state": state}).encode()
        try:
            status = decode_status(payload)
        except StatusError:
            return
        lines, skipped = health_lines(status, "gw-1", NOW, POLICY)
        assert lines[0].startswith(b"citynerve_gateway_health,gateway=gw-1 online=")
        assert len(lines) - 1 + skipped == len(devices)  # every entry is stored or counted as skipped
        assert all(b"\n" not in line for line in lines)

    check()
