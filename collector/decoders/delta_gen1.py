"""Gen-1 JSON stations (Delta Pro, Delta Max, River gen 1): `pd.`, `inv.`, `mppt.`, `ems.`, `bmsMaster.` keys."""

from __future__ import annotations

from typing import Any

from .reading import (
    finish,
    grid_from,
    number,
    out_watts,
    pd_port_watts,
    percent,
    remain_minutes,
    watts,
)

FAMILY = "delta_gen1"

# Key prefixes only gen-1 stations use.
PREFIXES = ("ems.", "bmsMaster.", "bmsSlave1.", "bmsSlave2.", "kit.")

# Extra packs report under these prefixes; pd.soc is the master pack only, not the headline.
_PACKS = {"bmsMaster.": "master", "bmsSlave1.": "slave1", "bmsSlave2.": "slave2"}

# Delta Pro reports mppt.inWatts in 0.1 W; the other gen-1 models in W.
_PV_SCALE = {"Delta Pro": 0.1, "Delta Max": 1.0, "River": 1.0, "River Max": 1.0, "River Pro": 1.0}


def decode(fields: dict[str, Any], model: str | None) -> tuple[dict[str, Any], dict[str, float]]:
    """Columns and per-pack SoCs from a flat gen-1 key map."""
    f = fields.get
    packs: dict[str, float] = {}
    for prefix, name in _PACKS.items():
        soc = percent(f(prefix + "f32ShowSoc", f(prefix + "soc")))
        if soc is not None:
            packs[name] = soc

    volts = number(f("inv.acInVol", f("inv.invInVol")))
    ac_in = watts(f("inv.inputWatts"))
    pv_scale = _PV_SCALE.get(model or "")
    values = {
        "soc_percent": percent(f("ems.f32LcdShowSoc", f("ems.lcdShowSoc"))),
        # 5999 / 5939 ("not discharging") clear the stored runtime (remain_minutes).
        "remain_time_min": remain_minutes(f("ems.dsgRemainTime")),
        "watts_in_sum": watts(f("pd.wattsInSum")),
        "watts_out_sum": out_watts(f("pd.wattsOutSum")),
        "ac_in_watts": ac_in,
        "ac_out_watts": out_watts(f("inv.outputWatts")),
        # The scale of mppt.inWatts depends on the model: leave it unknown rather than guess.
        "pv_in_watts": watts(f("mppt.inWatts"), pv_scale) if pv_scale else None,
        **pd_port_watts(f),
        "grid_connected": grid_from(None if volts is None else volts / 1000, ac_in,
                                    family=FAMILY),
        "battery_temp_c": number(f("bmsMaster.temp")),
    }
    return finish(values, packs), packs
