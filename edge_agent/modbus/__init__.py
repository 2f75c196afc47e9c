"""Modbus polling: pure decoding and request planning (decode, plan), device config, and the one I/O module
(poller) that talks to devices through pymodbus."""
