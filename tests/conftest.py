"""Shared fixtures: each area keeps its own in a plugin module so the files do not collide."""

from hypothesis import settings

pytest_plugins = [
    "tests.fixtures_fleet",
    "tests.fixtures_influx",
    "tests.fixtures_modbus",
    "tests.fixtures_mqtt",
]

# The properties test what is decoded, not how fast one example runs: on a loaded 2-core machine single examples
# overran hypothesis's 200 ms deadline (seen in test_modbus_decode) and failed a correct run. Speed is measured in
# bench/, against a baseline, not here.
settings.register_profile("citynerve", deadline=None)
settings.load_profile("citynerve")
