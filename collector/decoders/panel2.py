"""Smart Home Panel 2: the home panel that switches to Delta Pro Ultra batteries on an outage.

Layout from foxthefox/ioBroker.ecoflow-mqtt (lib/dict_data/ef_panel2_data.js, captures in
test/data2/panel2.json). The panel is not a battery itself: its columns describe the backup
batteries behind it and the grid at its mains.

- 12/32 state push: backup SoC `backupIncreInfo.backupBatPer` (%); per battery
  `Energy1Info`..`Energy3Info` `batteryPercentage` and `DeltaPro1Info`/`DeltaPro2Info`
  `batterySoc`, only for a slot the same message says is connected (`isConnect` 1: an empty
  slot reports 0); battery temperature `emsBatTemp` of the first connected battery; grid volts
  `masterIncreInfo.gridVol`, else the top-level `gridVol` (V).
- 12/1 statistics: minutes of backup left `backupInfo.backupDischargeTime`; the house's power
  from the grid `masterInfo.gridWatt` / `wattInfo.gridWatt`, used only as grid evidence (power
  flowing in first, PROTOCOL.md): it is the house's draw, not a battery's AC input, so no
  power column is filled from it.
"""

from __future__ import annotations

from typing import Any

from .reading import finish, grid_from, number, percent, remain_minutes

FAMILY = "panel2"

_SLOTS = (("Energy1Info", "batteryPercentage", "energy1"),
          ("Energy2Info", "batteryPercentage", "energy2"),
          ("Energy3Info", "batteryPercentage", "energy3"),
          ("DeltaPro1Info", "batterySoc", "deltapro1"),
          ("DeltaPro2Info", "batterySoc", "deltapro2"))


def decode(
    push: dict[str, Any], stat: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Columns and per-battery SoCs from a state push and a statistics message."""
    stat = stat or {}
    backup = push.get("backupIncreInfo") or {}
    master = push.get("masterIncreInfo") or {}
    packs: dict[str, float] = {}
    battery_temp = None
    for slot, key, name in _SLOTS:
        info = backup.get(slot) or {}
        if number(info.get("isConnect")) != 1:
            continue
        soc = percent(info.get(key))
        if soc is not None:
            packs[name] = soc
        if battery_temp is None:
            battery_temp = number(info.get("emsBatTemp"))

    volts = number(master.get("gridVol"))
    if volts is None:
        volts = number(push.get("gridVol"))
    grid_watts = [w for w in (number((stat.get("masterInfo") or {}).get("gridWatt")),
                              number((stat.get("wattInfo") or {}).get("gridWatt")))
                  if w is not None]
    values = {
        "soc_percent": percent(backup.get("backupBatPer")),
        "remain_time_min": remain_minutes((stat.get("backupInfo") or {}).get(
            "backupDischargeTime")),
        "grid_connected": grid_from(volts, max(grid_watts) if grid_watts else None,
                                    family=FAMILY),
        "battery_temp_c": battery_temp,
    }
    return finish(values, packs), packs
