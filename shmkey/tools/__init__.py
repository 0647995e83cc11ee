"""Tooling: the demo, the benchmark, the proxy rig, a load generator, a small
HTTP backend and a memory scanner. Only the command line and the test and
benchmark suites import this package; the library never does.
"""
