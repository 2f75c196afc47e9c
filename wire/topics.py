"""MQTT topic layout: <prefix>/<gateway_id>/up | status | report | down/<kind>. Pure functions.

report: the gateway's sealed reports on commands and configurations (wire/control.py); down/ack: end-to-end
acknowledgements (wire/ack.py); down/control: operators' signed documents, confidential (wire/seal.py 0x04)."""

from __future__ import annotations

import re

from wire.schema import GATEWAY_ID_PATTERN

DEFAULT_PREFIX = "citynerve/v1"
UP = "up"
STATUS = "status"
REPORT = "report"
DOWN = "down"

_GATEWAY_ID = re.compile(GATEWAY_ID_PATTERN)


def is_valid_gateway_id(gateway_id: str) -> bool:
    return bool(_GATEWAY_ID.match(gateway_id))


def up(prefix: str, gateway_id: str) -> str:
    return f"{prefix}/{gateway_id}/{UP}"


def status(prefix: str, gateway_id: str) -> str:
    return f"{prefix}/{gateway_id}/{STATUS}"


def report(prefix: str, gateway_id: str) -> str:
    return f"{prefix}/{gateway_id}/{REPORT}"


def down(prefix: str, gateway_id: str, kind: str) -> str:
    return f"{prefix}/{gateway_id}/{DOWN}/{kind}"


def subscription(prefix: str, leaf: str) -> str:
    """What a collector subscribes to for one leaf of every gateway, e.g. citynerve/v1/+/up."""
    return f"{prefix}/+/{leaf}"


def parse(prefix: str, topic: str) -> tuple[str, str] | None:
    """(gateway_id, leaf) of a topic under prefix, or None if the topic is not one of ours."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    gateway_id, sep, leaf = topic[len(head):].partition("/")
    if not sep or not is_valid_gateway_id(gateway_id) or not leaf:
        return None
    return gateway_id, leaf


def is_valid_prefix(prefix: str) -> bool:
    """A prefix is literal topic levels: no wildcards, no empty level, no NUL, no leading/trailing '/'."""
    return bool(prefix) and not any(c in prefix for c in "+#\x00") and "" not in prefix.split("/")


# --- the mount point of the gateways' listener -------------------------------------------------------------------
# mosquitto's `mount_point` (deploy/mosquitto/citynerve.conf) puts a prefix such as "gw/" in front of every topic
# a client of that listener publishes, subscribes to or leaves as its will. Gateways keep naming their own topics
# (citynerve/v1/<id>/up); a collector on a listener without a mount point sees and names them mounted
# (gw/citynerve/v1/<id>/up). These translate between the two; "" is no mount point (a plain broker).


def is_valid_mount(mount_point: str) -> bool:
    """Empty, or literal topic levels ending in '/' (no wildcards, no empty level, no NUL), not starting with '$'."""
    if not mount_point:
        return True
    return mount_point.endswith("/") and not mount_point.startswith("$") and is_valid_prefix(mount_point[:-1])


def mount(mount_point: str, topic: str) -> str:
    """A gateway's own topic or filter as a client outside its listener names it: gw/ + citynerve/v1/+/up."""
    return mount_point + topic


def unmount(mount_point: str, topic: str) -> str | None:
    """The gateway's own topic for a topic seen outside its listener (citynerve/v1/<id>/up for
    gw/citynerve/v1/<id>/up); None for a topic outside the mount point, which no gateway can have published."""
    if not topic.startswith(mount_point) or len(topic) == len(mount_point):
        return None
    return topic[len(mount_point):]


def is_own_topic(own_topic: str, received: str) -> bool:
    """Whether a topic a client received is `own_topic`, which it subscribed to by name. mosquitto 2.0.11 does not
    take a listener's mount point off the topics it delivers (eclipse/mosquitto#2244, fixed in 2.0.12): a gateway
    on the mounted listener receives gw/citynerve/v1/<id>/down/ack for citynerve/v1/<id>/down/ack."""
    if received == own_topic:
        return True
    mount_point = received[: len(received) - len(own_topic)]
    return received.endswith(own_topic) and mount_point != "" and is_valid_mount(mount_point)


# --- NATS's MQTT gateway (the clustered broker tier, deploy/nats) -----------------------------------------------
# nats-server maps an MQTT topic to a NATS subject level by level: '/' becomes '.', and the wildcards '+' and '#'
# become '*' and '>' (server/mqtt.go mqttToNATSSubjectConversion). Version 2.9 refuses a topic holding '.' or ' '
# (errMQTTUnsupportedCharacters: a gateway id with a '.' cannot publish through it), and an empty level has no
# subject form this system needs. A QoS 1 MQTT subscription is served by a JetStream consumer on the server's own
# stream "$MQTT_msgs", whose subjects are "$MQTT.msgs." + the subject; a message stored there with the header
# "Nmqtt-Pub: 1" reaches the subscriber at QoS 1 (mqttDeliverMsgCbQos1), a plain NATS publish at QoS 0.

NATS_QOS1_PREFIX = "$MQTT.msgs."
NATS_QOS_HEADER = "Nmqtt-Pub"


def nats_unsupported(topic: str) -> str | None:
    """Why NATS's MQTT gateway cannot carry `topic` (a topic, filter or prefix), or None when it can."""
    if "." in topic or " " in topic:
        return "'.' and ' ' cannot appear in an MQTT topic on nats-server 2.9"
    if "" in topic.split("/"):
        return "an empty topic level has no NATS subject"
    return None


def to_nats_subject(topic: str) -> str:
    """citynerve/v1/gw-1/up -> citynerve.v1.gw-1.up; filters: citynerve/v1/+/up -> citynerve.v1.*.up. The topic
    must be one `nats_unsupported` accepts."""
    return ".".join("*" if level == "+" else ">" if level == "#" else level for level in topic.split("/"))


def from_nats_subject(subject: str) -> str:
    """The MQTT topic of a subject that came from one (citynerve.v1.gw-1.up -> citynerve/v1/gw-1/up)."""
    return subject.replace(".", "/")
