"""Network UPS Tools variables (`LIST VAR <ups>`) as a reading: for stations that appear as USB
HID UPSes (River 3 Plus, Delta 3 Plus), with no cloud in the path at all.

`ups.status` flags are the truth, as for NUT's own upsmon:

- `OB` (on battery) means grid_connected = false, `OL` (on line) true, whatever
  `input.voltage` says (drivers keep reporting a stale or nominal voltage on battery, or 0 V on
  line). When both are set, `OB` wins. `input.voltage` (above 50 V = grid) decides only when
  the status has neither flag.
- `LB` (low battery) while on battery, and `FSD` (forced shutdown: the UPS is about to cut its
  output) at any time, mean the UPS itself says the battery is done: the reading gets
  grid_connected = false and soc_min_percent = 0, the value the policy's SoC trigger looks at,
  so it fires after the debounce whatever the charge and threshold. soc_percent keeps the
  reported `battery.charge`, so charts show the real charge.
- `LB` while on line (charging after an outage) changes nothing: low SoC on grid is never a
  trigger.
- Other flags (`CHRG`, `DISCHRG`, `BOOST`, `TRIM`, `RB`, ...) do not change the columns.
"""

from __future__ import annotations

import math

from collector.rows import HeadlineSoc

from .reading import DecodeError, Reading

FAMILY = "nut"


def number(text: str | None) -> float | None:
    """NUT sends every value as text; a finite number or None."""
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def decode_vars(ups: str, variables: dict[str, str], device_sn: str | None = None) -> Reading:
    """Map NUT's standard variables to our columns; the serial is the configured one, else the
    UPS's own (`device.serial` / `ups.serial`), else the UPS name."""
    if not variables:
        raise DecodeError(f"upsd returned no variables for UPS {ups!r}")
    v = variables.get
    values: dict = {}
    status = set((v("ups.status") or "").upper().split())
    # FSD: the UPS will cut its output whatever the grid does; treated as an empty battery.
    battery_done = "FSD" in status or ("OB" in status and "LB" in status)
    on_battery = "OB" in status or battery_done
    charge = number(v("battery.charge"))
    if charge is not None:
        # The UPS's charge is a headline figure, not a pack: where the same serial also gets
        # pack SoCs (from the cloud), the lowest pack stays soc_min (collector.rows).
        values["soc_percent"] = float(charge)
        values["soc_min_percent"] = HeadlineSoc(charge)
    if battery_done:
        values["soc_min_percent"] = 0.0
    runtime = number(v("battery.runtime"))
    if runtime is not None and on_battery:
        values["remain_time_min"] = round(runtime / 60)
    elif "OL" in status and not on_battery:
        # On line the UPS's runtime is "if the grid went now", not a discharge: clear the last
        # outage's figure (None clears the column) so no runtime condition starts from it.
        values["remain_time_min"] = None
    volts = number(v("input.voltage"))
    if on_battery or "OL" in status:
        values["grid_connected"] = not on_battery
    elif volts is not None:
        values["grid_connected"] = volts > 50
    power = number(v("ups.realpower"))
    if power is None:
        load, nominal = number(v("ups.load")), number(v("ups.realpower.nominal"))
        if load is not None and nominal is not None:
            power = load * nominal / 100
    if power is not None:
        values["watts_out_sum"] = round(power)
    temp = number(v("battery.temperature"))
    if temp is not None:
        values["battery_temp_c"] = float(temp)
    serial = device_sn or v("device.serial") or v("ups.serial") or ups
    maker, product = v("device.mfr") or v("ups.mfr"), v("device.model") or v("ups.model")
    model = " ".join(x for x in (maker, product) if x)
    return Reading(
        device_sn=serial.strip(), ts=None, values=values,
        raw={"format": "nut", "ups": ups, "variables": dict(variables)},
        family=FAMILY, model=model or None, source="nut",
    )
