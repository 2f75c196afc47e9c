"""Serial meters and sensors beyond Modbus: DSMR P1, IEC 62056-21, NMEA 0183, binary and ASCII sensors."""
