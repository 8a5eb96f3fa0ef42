"""First-generation Delta stations (Delta mini, Delta Max, Delta Pro): `pd.`, `inv.`, `mppt.`, `ems.`, `bmsMaster.` keys.

What their captures show (docs/decoding.md "Device families"):

- The headline SoC is `ems.f32LcdShowSoc` / `ems.lcdShowSoc`; `pd.soc` is the master pack only
  (a Delta Pro with an extra battery: pd.soc 90, packs 89.5 and 80.7, ems 84.6).
- `pd.remainTime` is positive in both directions: minutes to empty while discharging (a Delta
  Max giving out 101 W: 722, its battery's 111 W out of 1325 Wh last 716 min) and minutes to
  full while charging (equal to `ems.chgRemainTime`). `ems.dsgRemainTime` decides when the
  message has it; otherwise `pd.remainTime` counts only while the same message gives out more
  than it takes in, and 5999 / 5939 / 143999 clear the stored runtime.
- `mppt.inWatts` is in 0.1 W (Delta Max: 3092 for 65.8 V x 4.70 A; Delta Pro: 2340 for 233 W).
- A pd push has no `ems.` / `bmsMaster.` key: its first-generation-only keys mark it.
"""

from __future__ import annotations

from typing import Any

from .reading import (
    finish,
    grid_from,
    number,
    out_watts,
    pd_port_watts,
    pd_runtime_while_discharging,
    percent,
    prefixed_packs,
    remain_minutes,
    watts,
)

FAMILY = "delta_gen1"

# Key prefixes only gen-1 stations use.
PREFIXES = ("ems.", "bmsMaster.", "bmsSlave1.", "bmsSlave2.", "kit.")

# pd keys only first-generation Deltas send (in every Delta mini / Max / Pro capture, in no
# Delta 2 / River 2 one): they mark a pd push that carries no gen-1 prefix.
MARKER_KEYS = frozenset({"pd.iconWifiMode", "pd.chgPowerAc", "pd.dsgPowerAc"})

MODELS = frozenset({"Delta Pro", "Delta Max", "Delta Mini"})

# Extra packs report under these prefixes; pd.soc is the master pack only, not the headline.
_PACKS = {"bmsMaster.": "master", "bmsSlave1.": "slave1", "bmsSlave2.": "slave2"}

# mppt.inWatts is in 0.1 W on the first-generation Deltas (Delta Max capture: 3092 for 65.8 V x
# 4.70 A; Delta Pro: 2340 for 73.0 V x 3.19 A; Delta mini per ioBroker.ecoflow-mqtt's
# dictionary, its capture reads 0). Unknown model: unknown scale.
_PV_SCALE = {"Delta Pro": 0.1, "Delta Max": 0.1, "Delta Mini": 0.1}


def _remain(fields: dict[str, Any]) -> Any:
    """ems.dsgRemainTime when the message has it; else a positive pd.remainTime only while the
    same message gives out more than it takes in (otherwise it is minutes to full)."""
    if fields.get("ems.dsgRemainTime") is not None:
        return remain_minutes(fields["ems.dsgRemainTime"])
    return pd_runtime_while_discharging(fields.get)


def decode(fields: dict[str, Any], model: str | None) -> tuple[dict[str, Any], dict[str, float]]:
    """Columns and per-pack SoCs from a flat gen-1 key map."""
    f = fields.get
    packs = prefixed_packs(f, _PACKS)

    volts = number(f("inv.acInVol", f("inv.invInVol")))
    ac_in = watts(f("inv.inputWatts"))
    pv_scale = _PV_SCALE.get(model or "")
    values = {
        "soc_percent": percent(f("ems.f32LcdShowSoc", f("ems.lcdShowSoc"))),
        # 5999 / 5939 / 143999 ("not discharging") clear the stored runtime.
        "remain_time_min": _remain(fields),
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
