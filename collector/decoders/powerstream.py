"""PowerStream micro-inverter heartbeat (20/1): open MQTT `param`, REST `20_1.` keys and protobuf.

Field names are the camelCase ones EcoFlow's JSON uses; the protobuf schema's JSON names match
them, with `batDischargingTime` standing in for the JSON `dsgRemainTime`. Powers are 0.1 W.
"""

from __future__ import annotations

from typing import Any

from .reading import finish, number, out_watts, percent, remain_minutes, sum_all, watts

FAMILY = "powerstream"
PREFIX = "20_1."
DECIWATT = 0.1


def decode(fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """Columns from one heartbeat's fields (prefix already stripped)."""
    f = fields.get
    remain = f("dsgRemainTime", f("batDischargingTime"))
    # 5999 / 5939, or 0 while the battery is charging (battery watts negative), clear the
    # stored runtime. The inverter feeds the house: it says nothing about the grid.
    battery_watts = number(f("batInputWatts"))
    charging = battery_watts is not None and battery_watts < 0
    values = {
        "soc_percent": percent(f("batSoc")),
        "remain_time_min": remain_minutes(remain, charging),
        "pv_in_watts": sum_all(
            [watts(f("pv1InputWatts"), DECIWATT), watts(f("pv2InputWatts"), DECIWATT)]
        ),
        "ac_out_watts": out_watts(f("invOutputWatts"), DECIWATT),
    }
    return finish(values, {}), {}
