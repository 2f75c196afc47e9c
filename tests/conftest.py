"""Shared fixtures: each area keeps its own in a plugin module so the files do not collide."""

pytest_plugins = [
    "tests.fixtures_fleet",
    "tests.fixtures_influx",
    "tests.fixtures_modbus",
    "tests.fixtures_mqtt",
]
