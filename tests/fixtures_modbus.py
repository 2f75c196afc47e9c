"""Fixtures for real modbus servers."""
