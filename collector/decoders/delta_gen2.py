"""Gen-2 JSON stations (Delta 2 / 2 Max, River 2 / Pro / Max): `bms_emsStatus.`, `bms_bmsStatus.`, `pd.` keys."""

from __future__ import annotations

from typing import Any

from .reading import (
    CLEARED,
    REMAIN_TIME_SENTINELS,
    finish,
    grid_from,
    number,
    out_watts,
    pd_port_watts,
    percent,
    remain_minutes,
    sum_all,
    watts,
)

FAMILY = "delta_gen2"

PREFIXES = ("bms_emsStatus.", "bms_bmsStatus.", "bms_kitInfo.", "bms_slave.", "pd.", "inv.",
            "mppt.")


def _packs(fields: dict[str, Any]) -> dict[str, float]:
    f = fields.get
    packs: dict[str, float] = {}
    master = percent(f("bms_bmsStatus.f32ShowSoc", f("bms_bmsStatus.soc")))
    if master is not None:
        packs["master"] = master
    slave = percent(f("bms_slave.f32ShowSoc", f("bms_slave.soc")))
    if slave is not None:
        packs["slave1"] = slave
    kits = f("bms_kitInfo.watts")
    if isinstance(kits, list):
        for index, kit in enumerate(kits, start=1):
            # avaFlag 0 marks an empty slot, whose soc 0 means "nothing connected".
            if isinstance(kit, dict) and kit.get("avaFlag"):
                soc = percent(kit.get("f32Soc", kit.get("soc")))
                if soc is not None:
                    packs[f"kit{index}"] = soc
    return packs


def _remain(fields: dict[str, Any]) -> Any:
    # pd.remainTime is signed: negative = minutes to empty, positive = minutes to full. It is the
    # figure the station itself shows, so it wins over the EMS discharge estimate when negative.
    pd_remain = number(fields.get("pd.remainTime"))
    if pd_remain is not None and pd_remain < 0:
        return remain_minutes(-pd_remain)
    # "Not applicable" clears the stored runtime: dsgRemainTime 5999 / 5939, 0 while
    # pd.chgDsgState says charging (2), or pd.remainTime 5999 in a pdStatus of its own. A
    # positive pd.remainTime alone (minutes to full) says nothing about discharge.
    charging = number(fields.get("pd.chgDsgState")) == 2
    dsg = remain_minutes(fields.get("bms_emsStatus.dsgRemainTime"), charging)
    if dsg is None and pd_remain is not None and int(pd_remain) in REMAIN_TIME_SENTINELS:
        return CLEARED
    return dsg


def decode(fields: dict[str, Any], model: str | None) -> tuple[dict[str, Any], dict[str, float]]:
    """Columns and per-pack SoCs from a flat gen-2 key map."""
    f = fields.get
    packs = _packs(fields)
    # The headline SoC: the EMS's combined figure, else pd.soc; a bmsStatus-only message falls
    # back to the master pack, which is the headline on a station without extra batteries.
    soc = percent(f("bms_emsStatus.f32LcdShowSoc", f("bms_emsStatus.lcdShowSoc")))
    if soc is None:
        soc = percent(f("pd.soc"))
    if soc is None:
        soc = packs.get("master")

    pv = watts(f("mppt.inWatts"))
    if pv is not None and "mppt.pv2InWatts" in fields:
        pv2 = watts(f("mppt.pv2InWatts"))
        pv = None if pv2 is None else pv + pv2
    if pv is None:
        pv = sum_all([watts(f("pd.pv1ChargeWatts")), watts(f("pd.pv2ChargeWatts"))])

    volts = number(f("inv.acInVol"))
    ac_in = watts(f("inv.inputWatts"))
    values = {
        "soc_percent": soc,
        "remain_time_min": _remain(fields),
        "watts_in_sum": watts(f("pd.wattsInSum")),
        "watts_out_sum": out_watts(f("pd.wattsOutSum")),
        "ac_in_watts": ac_in,
        "ac_out_watts": out_watts(f("inv.outputWatts")),
        "pv_in_watts": pv,
        **pd_port_watts(f),
        "grid_connected": grid_from(None if volts is None else volts / 1000, ac_in,
                                    family=FAMILY),
        "battery_temp_c": number(f("bms_bmsStatus.temp")),
    }
    return finish(values, packs), packs
