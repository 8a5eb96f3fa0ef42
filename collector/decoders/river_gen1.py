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

from .reading import (
    finish,
    grid_from,
    number,
    out_watts,
    pd_runtime_while_discharging,
    percent,
    prefixed_packs,
    sum_all,
    watts,
)

FAMILY = "river_gen1"

# Keys only the first-generation Rivers use (Delta Pro / Max and the gen-2 stations name them
# `inv.acInVol`, `pd.typec1Watts`, and have no third USB-A port).
MARKER_KEYS = frozenset({"inv.invInVol", "pd.typecWatts", "pd.usb3Watts"})

MODELS = frozenset({"River", "River Pro", "River Max"})

_PACKS = {"bmsMaster.": "master", "bmsSlave1.": "slave1"}
_USB_KEYS = ("pd.usb1Watts", "pd.usb2Watts", "pd.usb3Watts")


def decode(fields: dict[str, Any], model: str | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """Columns and per-pack SoCs from a flat first-generation River key map."""
    f = fields.get
    packs = prefixed_packs(f, _PACKS)
    usb = [f(k) for k in _USB_KEYS]
    volts = number(f("inv.invInVol"))
    ac_in = watts(f("inv.inputWatts"))
    values = {
        "soc_percent": percent(f("pd.soc")),
        "remain_time_min": pd_runtime_while_discharging(f),
        "watts_in_sum": watts(f("pd.wattsInSum")),
        "watts_out_sum": out_watts(f("pd.wattsOutSum")),
        "ac_in_watts": ac_in,
        "ac_out_watts": out_watts(f("inv.outputWatts")),
        # No instantaneous solar power key: pd.chgSunPower is an energy counter.
        "usb_out_watts": None if None in usb else sum_all([out_watts(v) for v in usb]),
        "typec_out_watts": out_watts(f("pd.typecWatts")),
        "dc_out_watts": out_watts(f("pd.carWatts")),
        "grid_connected": grid_from(None if volts is None else volts / 1000, ac_in,
                                    family=FAMILY),
        "battery_temp_c": number(f("bmsMaster.temp")),
    }
    return finish(values, packs), packs
