"""First-generation River stations (River, River Pro, River Max): `pd.`, `inv.`, `bmsMaster.`, `bmsSlave1.` keys, no `ems.`.

What their captures show (docs/decoding.md "Device families"):

- There is no EMS module: `pd.soc` is the combined SoC the station shows. A River Max with its
  extra battery reported `pd.soc` 89 for packs at 87 % (7187 mAh full) and 91 % (6230 mAh):
  the capacity-weighted mean, not the master pack.
- `pd.remainTime` is positive whatever the direction. A River Pro discharging 98 W at 84 %
  reported 370 minutes, its time to empty; a River Max taking more in than it gave out reported
  698. It is a runtime only while the station gives out more than it takes in (same message);
  otherwise, and for 5999 / 5939, the stored runtime is cleared.
- AC-in voltage is `inv.invInVol` (mV), USB-A ports are `pd.usb1Watts`..`pd.usb3Watts`, the one
  USB-C port `pd.typecWatts`.
"""

from __future__ import annotations

from typing import Any

from .compiled import Table, rule
from .reading import (
    grid_from,
    number,
    out_watts,
    pd_runtime_while_discharging,
    percent,
    ports_sum,
    prefixed_packs,
    watts,
)

FAMILY = "river_gen1"

# Keys only the first-generation Rivers use (Delta Pro / Max and the gen-2 stations name them
# `inv.acInVol`, `pd.typec1Watts`, and have no third USB-A port).
MARKER_KEYS = frozenset({"inv.invInVol", "pd.typecWatts", "pd.usb3Watts"})

MODELS = frozenset({"River", "River Pro", "River Max"})

_PACKS = {"bmsMaster.": "master", "bmsSlave1.": "slave1"}
_PACK_KEYS = [p + k for p in _PACKS for k in ("f32ShowSoc", "soc")]
_USB_KEYS = ("pd.usb1Watts", "pd.usb2Watts", "pd.usb3Watts")


def _packs(f) -> dict[str, float]:
    return prefixed_packs(f, _PACKS)


def _grid(f, packs) -> Any:
    volts = number(f("inv.invInVol"))
    return grid_from(None if volts is None else volts / 1000, watts(f("inv.inputWatts")),
                     family=FAMILY)


# Column order as the decoder has always returned them.
TABLE = Table([
    rule("soc_percent", ["pd.soc"], lambda f, packs: percent(f("pd.soc"))),
    rule("remain_time_min", ["pd.remainTime", "pd.wattsInSum", "pd.wattsOutSum"],
         lambda f, packs: pd_runtime_while_discharging(f)),
    rule("watts_in_sum", ["pd.wattsInSum"], lambda f, packs: watts(f("pd.wattsInSum"))),
    rule("watts_out_sum", ["pd.wattsOutSum"], lambda f, packs: out_watts(f("pd.wattsOutSum"))),
    rule("ac_in_watts", ["inv.inputWatts"], lambda f, packs: watts(f("inv.inputWatts"))),
    rule("ac_out_watts", ["inv.outputWatts"], lambda f, packs: out_watts(f("inv.outputWatts"))),
    # No instantaneous solar power key: pd.chgSunPower is an energy counter.
    rule("usb_out_watts", _USB_KEYS, lambda f, packs: ports_sum([f(k) for k in _USB_KEYS])),
    rule("typec_out_watts", ["pd.typecWatts"], lambda f, packs: out_watts(f("pd.typecWatts"))),
    rule("dc_out_watts", ["pd.carWatts"], lambda f, packs: out_watts(f("pd.carWatts"))),
    rule("grid_connected", ["inv.invInVol", "inv.inputWatts"], _grid),
    rule("battery_temp_c", ["bmsMaster.temp"], lambda f, packs: number(f("bmsMaster.temp"))),
], _packs, _PACK_KEYS)


def decode(fields: dict[str, Any], model: str | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """Columns and per-pack SoCs from a flat first-generation River key map (TABLE: only the
    rules its keys reach run)."""
    return TABLE.decode(fields)
