"""Gen-3 stations (River 3 / 3 Plus, Delta 3, Delta Pro 3): display, runtime, CMS and BMS messages.

Works on camelCase field maps: the JSON names of our protobuf schema, which are also the bare
keys Delta Pro 3 uses in REST `quota/all` (`cmsBattSoc`, `powInSumW`, ...).
"""

from __future__ import annotations

from typing import Any

from .reading import finish, grid_from, number, out_watts, percent, remain_minutes, sum_all, watts

FAMILY = "gen3"

# Bare keys that mark a Delta Pro 3 style REST map.
MARKER_KEYS = frozenset({"cmsBattSoc", "powInSumW", "powOutSumW", "powGetAcIn", "bmsBattSoc"})


def _sum_present(*values: Any) -> int | None:
    """Sum of output magnitudes over the ports this message carries, None when it carries none."""
    present = [out_watts(v) for v in values if number(v) is not None]
    return sum(present) if present else None


def battery(
    fields: dict[str, Any],
    cms: dict[str, Any] | None = None,
    bms_packs: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """SoC, runtime and battery temperature columns, and per-pack SoCs, from display fields
    (`cmsBattSoc`, `bmsBattSoc`, `cmsDsgRemTime`), a CMS status and BMS heartbeats: the same
    fields on every gen-3 station and on Stream."""
    f = fields.get
    cms = cms or {}
    packs: dict[str, float] = {}
    main_pack = percent(f("bmsBattSoc"))
    if main_pack is not None:
        packs["pack0"] = main_pack
    battery_temp = None
    for pack in bms_packs or []:
        soc = percent(pack.get("f32ShowSoc", pack.get("soc")))
        num = number(pack.get("num")) or 0
        if soc is not None:
            packs[f"pack{int(num)}"] = soc
        if battery_temp is None:
            battery_temp = number(pack.get("temp"))

    soc = percent(f("cmsBattSoc"))
    if soc is None:
        soc = percent(cms.get("f32LcdShowSoc", cms.get("lcdShowSoc")))
    remain = f("cmsDsgRemTime")
    if number(remain) is None:
        remain = cms.get("dsgRemainTime")
    # 5939 / 5999, or 0 while the CMS says charging (282 = 2), clear the stored runtime.
    charging = number(f("cmsChgDsgState")) == 2
    return {
        "soc_percent": soc,
        "remain_time_min": remain_minutes(remain, charging),
        "battery_temp_c": battery_temp,
    }, packs


def decode(
    fields: dict[str, Any],
    cms: dict[str, Any] | None = None,
    bms_packs: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Columns and per-pack SoCs from display/runtime fields, a CMS status and BMS heartbeats."""
    f = fields.get
    values, packs = battery(fields, cms, bms_packs)

    # Delta Pro 3 splits AC out and PV in over two ports; the others report one total each.
    ac_out = _sum_present(f("powGetAcHvOut"), f("powGetAcLvOut"))
    if ac_out is None:
        ac_out = out_watts(f("powGetAcOut"))
    pv = _sum_present(f("powGetPvH"), f("powGetPvL"))
    if pv is None:
        pv = watts(f("powGetPv"))

    ac_in = watts(f("powGetAcIn"))
    values.update({
        "watts_in_sum": watts(f("powInSumW")),
        "watts_out_sum": out_watts(f("powOutSumW")),
        "ac_in_watts": ac_in,
        "ac_out_watts": ac_out,
        "pv_in_watts": pv,
        "usb_out_watts": sum_all([out_watts(f("powGetQcusb1")), out_watts(f("powGetQcusb2"))]),
        "typec_out_watts": sum_all([out_watts(f("powGetTypec1")), out_watts(f("powGetTypec2"))]),
        # AC-in power first (a River 3 Plus read 0 V and flag 0 with 83 W in), then runtime 68
        # volts, then the AC-in flag (61) and the AC-charger flag (202, REST
        # plugInInfoAcChargerFlag) as weak evidence.
        "grid_connected": grid_from(number(f("plugInInfoAcInVol")), ac_in,
                                    f("plugInInfoAcInFlag"), f("plugInInfoAcChargerFlag"),
                                    family=FAMILY),
    })
    return finish(values, packs), packs
