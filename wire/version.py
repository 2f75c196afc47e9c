"""citynerve's version: the installed distribution's, i.e. pyproject.toml's [project] version. One source: the
agent's status heartbeat (wire/status.py `version`), both programs' --version and the wheel all take it from here."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "citynerve"


def _installed() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # a source tree run without being installed (pip install -e . fixes it)
        return "0+unknown"


VERSION = _installed()
