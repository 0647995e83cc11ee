"""Tooling: the demo, the benchmark, the proxy rig, a load generator, a small
HTTP backend, throwaway certificates, a memory scanner and timing statistics.
Only the command line and the test and benchmark suites import it, never the library.
"""
