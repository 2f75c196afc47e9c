"""Local laboratory for tests, the demo and benchmarks: real servers on loopback, in temp dirs.

Not part of the installed distribution; the gateway and the collector never import it.
"""
