"""ecoflow-nut: every station as a UPS on the Network UPS Tools network protocol (TCP 3493),
read-only, with the policy worker's shutdown decisions shown as FSD (docs/nut-server.md)."""

VERSION = "1.0"
