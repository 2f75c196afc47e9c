"""The collector's InfluxDB output: line protocol, config, HTTP backends (1.x and 2.x APIs), batching."""
