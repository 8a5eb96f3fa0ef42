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

from .compiled import Table, rule
from .reading import (
    TYPEC_KEYS,
    USB_KEYS,
    grid_from,
    number,
    out_watts,
    pd_runtime_while_discharging,
    percent,
    ports_sum,
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
_PACK_KEYS = [p + k for p in _PACKS for k in ("f32ShowSoc", "soc")]

# mppt.inWatts is in 0.1 W on the first-generation Deltas (Delta Max capture: 3092 for 65.8 V x
# 4.70 A; Delta Pro: 2340 for 73.0 V x 3.19 A; Delta mini per ioBroker.ecoflow-mqtt's
# dictionary, its capture reads 0). Unknown model: unknown scale.
_PV_SCALE = {"Delta Pro": 0.1, "Delta Max": 0.1, "Delta Mini": 0.1}


def _packs(f) -> dict[str, float]:
    return prefixed_packs(f, _PACKS)


def _remain(f, packs) -> Any:
    """ems.dsgRemainTime when the message has it; else a positive pd.remainTime only while the
    same message gives out more than it takes in (otherwise it is minutes to full)."""
    dsg = f("ems.dsgRemainTime")
    if dsg is not None:
        return remain_minutes(dsg)
    # 5999 / 5939 / 143999 ("not discharging") clear the stored runtime.
    return pd_runtime_while_discharging(f)


def _grid(f, packs) -> Any:
    volts = number(f("inv.acInVol", f("inv.invInVol")))
    return grid_from(None if volts is None else volts / 1000, watts(f("inv.inputWatts")),
                     family=FAMILY)


def _table(pv_scale: float | None) -> Table:
    """The family's table for one `mppt.inWatts` scale; without one, PV stays unknown (the
    scale depends on the model: it is left unknown rather than guessed)."""
    pv = ([rule("pv_in_watts", ["mppt.inWatts"],
                lambda f, packs: watts(f("mppt.inWatts"), pv_scale))] if pv_scale else [])
    # Column order as the decoder has always returned them.
    return Table([
        rule("soc_percent", ["ems.f32LcdShowSoc", "ems.lcdShowSoc"],
             lambda f, packs: percent(f("ems.f32LcdShowSoc", f("ems.lcdShowSoc")))),
        rule("remain_time_min", ["ems.dsgRemainTime", "pd.remainTime", "pd.wattsInSum",
                                 "pd.wattsOutSum"], _remain),
        rule("watts_in_sum", ["pd.wattsInSum"], lambda f, packs: watts(f("pd.wattsInSum"))),
        rule("watts_out_sum", ["pd.wattsOutSum"],
             lambda f, packs: out_watts(f("pd.wattsOutSum"))),
        rule("ac_in_watts", ["inv.inputWatts"], lambda f, packs: watts(f("inv.inputWatts"))),
        rule("ac_out_watts", ["inv.outputWatts"],
             lambda f, packs: out_watts(f("inv.outputWatts"))),
        *pv,
        rule("usb_out_watts", USB_KEYS, lambda f, packs: ports_sum([f(k) for k in USB_KEYS])),
        rule("typec_out_watts", TYPEC_KEYS,
             lambda f, packs: ports_sum([f(k) for k in TYPEC_KEYS])),
        rule("dc_out_watts", ["pd.carWatts"], lambda f, packs: out_watts(f("pd.carWatts"))),
        rule("grid_connected", ["inv.acInVol", "inv.invInVol", "inv.inputWatts"], _grid),
        rule("battery_temp_c", ["bmsMaster.temp"],
             lambda f, packs: number(f("bmsMaster.temp"))),
    ], _packs, _PACK_KEYS)


# One table per PV scale the models have (and none for an unknown model).
TABLES = {scale: _table(scale) for scale in {None, *_PV_SCALE.values()}}


def table_for(model: str | None) -> Table:
    return TABLES[_PV_SCALE.get(model or "")]


def decode(fields: dict[str, Any], model: str | None) -> tuple[dict[str, Any], dict[str, float]]:
    """Columns and per-pack SoCs from a flat gen-1 key map (the model's table: only the rules
    its keys reach run)."""
    return table_for(model).decode(fields)
