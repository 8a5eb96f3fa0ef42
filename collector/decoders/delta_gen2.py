"""Gen-2 JSON stations (Delta 2 / 2 Max, River 2 / Pro / Max): `bms_emsStatus.`, `bms_bmsStatus.`, `pd.` keys."""

from __future__ import annotations

from typing import Any

from .compiled import Table, rule
from .reading import (
    CLEARED,
    REMAIN_TIME_SENTINELS,
    TYPEC_KEYS,
    USB_KEYS,
    grid_from,
    number,
    out_watts,
    percent,
    ports_sum,
    remain_minutes,
    sum_all,
    watts,
)

FAMILY = "delta_gen2"

PREFIXES = ("bms_emsStatus.", "bms_bmsStatus.", "bms_kitInfo.", "bms_slave.", "pd.", "inv.",
            "mppt.")


_MISSING = object()

_MASTER = ("bms_bmsStatus.f32ShowSoc", "bms_bmsStatus.soc")
_SLAVE = ("bms_slave.f32ShowSoc", "bms_slave.soc")
_KITS = "bms_kitInfo.watts"


def _packs(f) -> dict[str, float]:
    packs: dict[str, float] = {}
    master = percent(f(_MASTER[0], f(_MASTER[1])))
    if master is not None:
        packs["master"] = master
    slave = percent(f(_SLAVE[0], f(_SLAVE[1])))
    if slave is not None:
        packs["slave1"] = slave
    kits = f(_KITS)
    if isinstance(kits, list):
        for index, kit in enumerate(kits, start=1):
            # avaFlag 0 marks an empty slot, whose soc 0 means "nothing connected".
            if isinstance(kit, dict) and kit.get("avaFlag"):
                soc = percent(kit.get("f32Soc", kit.get("soc")))
                if soc is not None:
                    packs[f"kit{index}"] = soc
    return packs


def _soc(f, packs) -> Any:
    # The headline SoC: the EMS's combined figure, else pd.soc; a bmsStatus-only message falls
    # back to the master pack, which is the headline on a station without extra batteries.
    soc = percent(f("bms_emsStatus.f32LcdShowSoc", f("bms_emsStatus.lcdShowSoc")))
    if soc is None:
        soc = percent(f("pd.soc"))
    if soc is None:
        soc = packs.get("master")
    return soc


def _remain(f, packs) -> Any:
    # pd.remainTime is signed: negative = minutes to empty, positive = minutes to full. It is the
    # figure the station itself shows, so it wins over the EMS discharge estimate when negative.
    pd_remain = number(f("pd.remainTime"))
    if pd_remain is not None and pd_remain < 0:
        return remain_minutes(-pd_remain)
    # "Not applicable" clears the stored runtime: dsgRemainTime 5999 / 5939, 0 while
    # pd.chgDsgState says charging (2), or pd.remainTime 5999 in a pdStatus of its own. A
    # positive pd.remainTime alone (minutes to full) says nothing about discharge.
    charging = number(f("pd.chgDsgState")) == 2
    dsg = remain_minutes(f("bms_emsStatus.dsgRemainTime"), charging)
    if dsg is None and pd_remain is not None and int(pd_remain) in REMAIN_TIME_SENTINELS:
        return CLEARED
    return dsg


def _pv(f, packs) -> Any:
    pv = watts(f("mppt.inWatts"))
    if pv is not None:
        pv2 = f("mppt.pv2InWatts", _MISSING)
        if pv2 is not _MISSING:
            pv2 = watts(pv2)
            pv = None if pv2 is None else pv + pv2
    if pv is None:
        pv = sum_all([watts(f("pd.pv1ChargeWatts")), watts(f("pd.pv2ChargeWatts"))])
    return pv


def _grid(f, packs) -> Any:
    volts = number(f("inv.acInVol"))
    return grid_from(None if volts is None else volts / 1000, watts(f("inv.inputWatts")),
                     family=FAMILY)


# Column order as the decoder has always returned them.
TABLE = Table([
    rule("soc_percent", ["bms_emsStatus.f32LcdShowSoc", "bms_emsStatus.lcdShowSoc", "pd.soc",
                         *_MASTER], _soc),
    rule("remain_time_min", ["pd.remainTime", "pd.chgDsgState", "bms_emsStatus.dsgRemainTime"],
         _remain),
    rule("watts_in_sum", ["pd.wattsInSum"], lambda f, packs: watts(f("pd.wattsInSum"))),
    rule("watts_out_sum", ["pd.wattsOutSum"], lambda f, packs: out_watts(f("pd.wattsOutSum"))),
    rule("ac_in_watts", ["inv.inputWatts"], lambda f, packs: watts(f("inv.inputWatts"))),
    rule("ac_out_watts", ["inv.outputWatts"], lambda f, packs: out_watts(f("inv.outputWatts"))),
    rule("pv_in_watts", ["mppt.inWatts", "mppt.pv2InWatts", "pd.pv1ChargeWatts",
                         "pd.pv2ChargeWatts"], _pv),
    rule("usb_out_watts", USB_KEYS, lambda f, packs: ports_sum([f(k) for k in USB_KEYS])),
    rule("typec_out_watts", TYPEC_KEYS, lambda f, packs: ports_sum([f(k) for k in TYPEC_KEYS])),
    rule("dc_out_watts", ["pd.carWatts"], lambda f, packs: out_watts(f("pd.carWatts"))),
    rule("grid_connected", ["inv.acInVol", "inv.inputWatts"], _grid),
    rule("battery_temp_c", ["bms_bmsStatus.temp"],
         lambda f, packs: number(f("bms_bmsStatus.temp"))),
], _packs, [*_MASTER, *_SLAVE, _KITS])


def decode(fields: dict[str, Any], model: str | None) -> tuple[dict[str, Any], dict[str, float]]:
    """Columns and per-pack SoCs from a flat gen-2 key map (TABLE: only the rules its keys
    reach run)."""
    return TABLE.decode(fields)
