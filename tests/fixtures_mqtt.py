"""Fixtures for real mqtt servers."""
