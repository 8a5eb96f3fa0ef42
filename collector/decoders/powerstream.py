"""PowerStream micro-inverter heartbeat (20/1): open MQTT `param`, REST `20_1.` keys and protobuf.

Field names are the camelCase ones EcoFlow's JSON uses; the protobuf schema's JSON names match
them, with `batDischargingTime` standing in for the JSON `dsgRemainTime`. Powers are 0.1 W.
"""

from __future__ import annotations

from typing import Any

from .compiled import Table, rule
from .reading import number, out_watts, percent, remain_minutes, sum_all, watts

FAMILY = "powerstream"
PREFIX = "20_1."
DECIWATT = 0.1


def _remain(f, packs) -> Any:
    # 5999 / 5939, or 0 while the battery is charging (battery watts negative), clear the
    # stored runtime. The inverter feeds the house: it says nothing about the grid.
    battery_watts = number(f("batInputWatts"))
    charging = battery_watts is not None and battery_watts < 0
    return remain_minutes(f("dsgRemainTime", f("batDischargingTime")), charging)


# Column order as the decoder has always returned them. No packs: a heartbeat reports one
# battery.
TABLE = Table([
    rule("soc_percent", ["batSoc"], lambda f, packs: percent(f("batSoc"))),
    rule("remain_time_min", ["dsgRemainTime", "batDischargingTime", "batInputWatts"], _remain),
    rule("pv_in_watts", ["pv1InputWatts", "pv2InputWatts"],
         lambda f, packs: sum_all([watts(f("pv1InputWatts"), DECIWATT),
                                   watts(f("pv2InputWatts"), DECIWATT)])),
    rule("ac_out_watts", ["invOutputWatts"],
         lambda f, packs: out_watts(f("invOutputWatts"), DECIWATT)),
], lambda f: {}, [])


def decode(fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """Columns from one heartbeat's fields, prefix already stripped (TABLE: only the rules its
    keys reach run)."""
    return TABLE.decode(fields)
