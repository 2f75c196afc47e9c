"""Fixtures for real influx servers."""
