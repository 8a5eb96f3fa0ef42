"""Smart Plug heartbeat (2/1): open MQTT `param`, REST `2_1.` keys and protobuf.

A plug is not a power station: its heartbeat (watts in 0.1 W, mA, V, switch state) fills none
of the station columns, so a decoded plug reading carries its values in `raw` only.
"""

from __future__ import annotations

from typing import Any

FAMILY = "smartplug"
PREFIX = "2_1."


def decode(fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """No station columns: a plug's own measurements stay in raw."""
    del fields
    return {}, {}
