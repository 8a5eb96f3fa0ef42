"""Throwaway local PostgreSQL (with TimescaleDB when installed) and Mosquitto servers.

Started from the machine's own binaries on free ports under a temporary directory; used by the
test fixtures and by `make demo`. Every server stops itself when its owner exits.
"""
