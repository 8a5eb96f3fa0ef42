"""Network UPS Tools variables (`LIST VAR <ups>`) as a reading: for stations that appear as USB
HID UPSes (River 3 Plus, Delta 3 Plus), with no cloud in the path at all."""

from __future__ import annotations

import math

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
    charge = number(v("battery.charge"))
    if charge is not None:
        values["soc_percent"] = values["soc_min_percent"] = float(charge)
    status = (v("ups.status") or "").split()
    on_battery = "OB" in status
    runtime = number(v("battery.runtime"))
    if runtime is not None and on_battery:
        values["remain_time_min"] = round(runtime / 60)
    volts = number(v("input.voltage"))
    if volts is not None:
        values["grid_connected"] = volts > 50
    elif "OL" in status or on_battery:
        values["grid_connected"] = "OL" in status and not on_battery
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
