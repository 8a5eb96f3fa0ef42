"""Delta Pro Ultra (serial prefix Y711): its own protobuf messages on cmd_func 2.

Layout and units from foxthefox/ioBroker.ecoflow-mqtt (lib/dict_data/ef_deltaproultra_data.js,
captures in test/data2/deltaproultra.json):

- 2/1 app show heartbeat: `soc` (21, %), `remainTime` (26, min), `wattsInSum`/`wattsOutSum`
  (41/42), USB-A `outUsb1Pwr`+`outUsb2Pwr`, USB-C `outTypec1Pwr`+`outTypec2Pwr`, 12 V
  `outAdsPwr` ("Output power DC12V"), AC outlets `outAcL1_1Pwr`, `outAcL1_2Pwr`, `outAcL2_1Pwr`,
  `outAcL2_2Pwr`, `outAcTtPwr` (TT-30), `outAcL14Pwr` (L14-30), `outAc_5p8Pwr` (Power I/O out),
  AC in `inAcC20Pwr` (AC input) + `inAc_5p8Pwr` (Power I/O in), PV `inLvMpptPwr` +
  `inHvMpptPwr`. A sum is known only when every port of it is in the message.
- 2/2 backend heartbeat: AC-in voltages `inAcC20Vol`, `inAc_5p8Vol` (V) for grid_connected.
- 2/4 battery-pack report: per pack `bpNo`, `bpSoc`, `bpTemp` (deg C).

`remainTime` does not say which way it counts: like first-generation River it is minutes to
empty only while the same message has more going out than coming in (`wattsOutSum` >
`wattsInSum`); with more coming in it is cleared, with both equal it is not decoded.
"""

from __future__ import annotations

from typing import Any

from .reading import (
    CLEARED,
    finish,
    grid_from,
    number,
    out_watts,
    percent,
    remain_minutes,
    sum_all,
    watts,
)

FAMILY = "delta_pro_ultra"
MODEL = "Delta Pro Ultra"

_AC_OUT = ("outAcL11Pwr", "outAcL12Pwr", "outAcL21Pwr", "outAcL22Pwr", "outAcTtPwr",
           "outAcL14Pwr", "outAc5p8Pwr")


def _sum(f, keys: tuple[str, ...]) -> int | None:
    raw = [f(k) for k in keys]
    return None if None in raw else sum_all([out_watts(v) for v in raw])


def _remain(f) -> Any:
    w_in, w_out = number(f("wattsInSum")), number(f("wattsOutSum"))
    minutes = remain_minutes(f("remainTime"))
    if minutes is None or minutes is CLEARED or w_in is None or w_out is None:
        return minutes
    if w_out > w_in:
        return minutes
    return CLEARED if w_in > w_out else None


def decode(
    show: dict[str, Any],
    backend: dict[str, Any] | None = None,
    packs_report: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Columns and per-pack SoCs from the show heartbeat, backend heartbeat and pack report."""
    f = show.get
    backend = backend or {}
    packs: dict[str, float] = {}
    battery_temp = None
    for pack in packs_report or []:
        soc = percent(pack.get("bpSoc"))
        num = number(pack.get("bpNo"))
        if soc is not None and num is not None:
            packs[f"pack{int(num)}"] = soc
        if battery_temp is None:
            battery_temp = number(pack.get("bpTemp"))

    ac_in = _sum(f, ("inAcC20Pwr", "inAc5p8Pwr"))
    volts = [v for v in (number(backend.get("inAcC20Vol")), number(backend.get("inAc5p8Vol")))
             if v is not None]
    values = {
        "soc_percent": percent(f("soc")),
        "remain_time_min": _remain(f),
        "watts_in_sum": watts(f("wattsInSum")),
        "watts_out_sum": out_watts(f("wattsOutSum")),
        "ac_in_watts": ac_in,
        "ac_out_watts": _sum(f, _AC_OUT),
        "usb_out_watts": _sum(f, ("outUsb1Pwr", "outUsb2Pwr")),
        "typec_out_watts": _sum(f, ("outTypec1Pwr", "outTypec2Pwr")),
        "dc_out_watts": out_watts(f("outAdsPwr")),
        "pv_in_watts": _sum(f, ("inLvMpptPwr", "inHvMpptPwr")),
        # AC-in power first; else the higher of the two AC-in voltages the backend reports.
        "grid_connected": grid_from(max(volts) if volts else None, ac_in, family=FAMILY),
        "battery_temp_c": battery_temp,
    }
    return finish(values, packs), packs
