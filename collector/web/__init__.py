"""The fleet page the collector serves when [web] is configured (docs/dashboards.md)."""
