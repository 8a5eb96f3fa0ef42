"""PowerOcean (home battery with hybrid inverter): cmd_func 96, PowerOcean only.

Layout from foxthefox/ioBroker.ecoflow-mqtt (lib/dict_data/ef_powerocean_data.js, captures in
test/data2/powerocean.json); the battery-pack report's first fields agree with wire bytes of a
PowerOcean frame (shuette42/ecoflow-energy-ha issue #225).

- 96/8 EMS change report: system SoC `bpSoc` (field 7, %).
- 96/7 battery-pack report: per pack `bpSoc` (2), named by `bpSn` (16), else by position.
- 96/1 EMS heartbeat: PV power, the sum of every string's `pwr` in `mpptHeartBeat[].mpptPv[]`
  (each is volts x amps in the capture: 397.8 V x 4.397 A = 1749.2 W).

Not decoded (kept raw): the grid state `sysGridSta` (its values are not documented), the
inverter, meter and battery powers (`pcsActPwr`, `pcsMeterPower`, `emsBpPower`: their signs
are not established), `bpDsgTime` (600000 while charging: unit and "not applicable" value not
established), and pack temperatures (`bpTemp` lists cells, not one battery temperature).
"""

from __future__ import annotations

from typing import Any

from .reading import finish, number, percent, watts

FAMILY = "powerocean"


def decode(
    change: dict[str, Any],
    heartbeat: dict[str, Any] | None = None,
    packs_report: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Columns and per-pack SoCs from the EMS change report, EMS heartbeat and pack report."""
    heartbeat = heartbeat or {}
    packs: dict[str, float] = {}
    for index, pack in enumerate(packs_report or [], start=1):
        soc = percent(pack.get("bpSoc"))
        if soc is not None:
            packs[str(pack.get("bpSn") or f"pack{index}")] = soc

    pv = None
    strings = [s for mppt in heartbeat.get("mpptHeartBeat") or []
               for s in mppt.get("mpptPv") or []]
    if strings:
        powers = [number(s.get("pwr")) for s in strings]
        pv = None if None in powers else watts(sum(powers))  # type: ignore[arg-type]
    values = {
        "soc_percent": percent(change.get("bpSoc")),
        "pv_in_watts": pv,
    }
    return finish(values, packs), packs
