"""Gen-3 stations (River 3 / 3 Plus, Delta 3, Delta Pro 3): display, runtime, CMS and BMS messages.

Works on camelCase field maps: the JSON names of our protobuf schema, which are also the bare
keys Delta Pro 3 uses in REST `quota/all` (`cmsBattSoc`, `powInSumW`, ...).
"""

from __future__ import annotations

from typing import Any

from .compiled import Table, rule
from .reading import grid_from, number, out_watts, percent, remain_minutes, sum_all, watts

FAMILY = "gen3"

# Bare keys that mark a Delta Pro 3 style REST map.
MARKER_KEYS = frozenset({"cmsBattSoc", "powInSumW", "powOutSumW", "powGetAcIn", "bmsBattSoc"})


class _Part:
    """A key under which `decode` hands the tables a CMS status or the BMS heartbeats beside
    the display fields: not a string, so no JSON or protobuf field can be it."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


CMS = _Part("cms status")  # a dict: f32LcdShowSoc / lcdShowSoc, dsgRemainTime
BMS = _Part("bms heartbeats")  # a list of dicts: f32ShowSoc / soc, num, temp


def _sum_present(*values: Any) -> int | None:
    """Sum of output magnitudes over the ports this message carries, None when it carries none."""
    present = [out_watts(v) for v in values if number(v) is not None]
    return sum(present) if present else None


def _packs(f) -> dict[str, float]:
    packs: dict[str, float] = {}
    main_pack = percent(f("bmsBattSoc"))
    if main_pack is not None:
        packs["pack0"] = main_pack
    for pack in f(BMS) or ():
        soc = percent(pack.get("f32ShowSoc", pack.get("soc")))
        if soc is not None:
            packs[f"pack{int(number(pack.get('num')) or 0)}"] = soc
    return packs


def _soc(f, packs) -> Any:
    soc = percent(f("cmsBattSoc"))
    if soc is None:
        cms = f(CMS) or {}
        soc = percent(cms.get("f32LcdShowSoc", cms.get("lcdShowSoc")))
    return soc


def _remain(f, packs) -> Any:
    remain = f("cmsDsgRemTime")
    if number(remain) is None:
        remain = (f(CMS) or {}).get("dsgRemainTime")
    # 5939 / 5999, or 0 while the CMS says charging (282 = 2), clear the stored runtime.
    return remain_minutes(remain, number(f("cmsChgDsgState")) == 2)


def _battery_temp(f, packs) -> Any:
    for pack in f(BMS) or ():
        temp = number(pack.get("temp"))
        if temp is not None:
            return temp
    return None


# SoC, runtime and battery temperature from display fields (`cmsBattSoc`, `bmsBattSoc`,
# `cmsDsgRemTime`), a CMS status and BMS heartbeats: the same on every gen-3 station and on
# Stream (stream.TABLE starts with these).
BATTERY_RULES = [
    rule("soc_percent", ["cmsBattSoc", CMS], _soc),
    rule("remain_time_min", ["cmsDsgRemTime", "cmsChgDsgState", CMS], _remain),
    rule("battery_temp_c", [BMS], _battery_temp),
]
PACK_KEYS = ["bmsBattSoc", BMS]


def _ac_out(f, packs) -> Any:
    # Delta Pro 3 splits AC out and PV in over two ports; the others report one total each.
    ac_out = _sum_present(f("powGetAcHvOut"), f("powGetAcLvOut"))
    return out_watts(f("powGetAcOut")) if ac_out is None else ac_out


def _pv(f, packs) -> Any:
    pv = _sum_present(f("powGetPvH"), f("powGetPvL"))
    return watts(f("powGetPv")) if pv is None else pv


def _grid(f, packs) -> Any:
    # AC-in power first (a River 3 Plus read 0 V and flag 0 with 83 W in), then runtime 68
    # volts, then the AC-in flag (61) and the AC-charger flag (202, REST
    # plugInInfoAcChargerFlag) as weak evidence.
    return grid_from(number(f("plugInInfoAcInVol")), watts(f("powGetAcIn")),
                     f("plugInInfoAcInFlag"), f("plugInInfoAcChargerFlag"), family=FAMILY)


# Column order as the decoder has always returned them.
TABLE = Table([
    *BATTERY_RULES,
    rule("watts_in_sum", ["powInSumW"], lambda f, packs: watts(f("powInSumW"))),
    rule("watts_out_sum", ["powOutSumW"], lambda f, packs: out_watts(f("powOutSumW"))),
    rule("ac_in_watts", ["powGetAcIn"], lambda f, packs: watts(f("powGetAcIn"))),
    rule("ac_out_watts", ["powGetAcHvOut", "powGetAcLvOut", "powGetAcOut"], _ac_out),
    rule("pv_in_watts", ["powGetPvH", "powGetPvL", "powGetPv"], _pv),
    rule("usb_out_watts", ["powGetQcusb1", "powGetQcusb2"],
         lambda f, packs: sum_all([out_watts(f("powGetQcusb1")), out_watts(f("powGetQcusb2"))])),
    rule("typec_out_watts", ["powGetTypec1", "powGetTypec2"],
         lambda f, packs: sum_all([out_watts(f("powGetTypec1")), out_watts(f("powGetTypec2"))])),
    rule("grid_connected", ["plugInInfoAcInVol", "powGetAcIn", "plugInInfoAcInFlag",
                            "plugInInfoAcChargerFlag"], _grid),
], _packs, PACK_KEYS)


def with_parts(fields: dict[str, Any], cms: dict[str, Any] | None,
               bms_packs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The display fields with the CMS status and BMS heartbeats under CMS and BMS, as the
    tables read them (the fields themselves when there are none)."""
    if not cms and not bms_packs:
        return fields
    parts = dict(fields)
    if cms:
        parts[CMS] = cms
    if bms_packs:
        parts[BMS] = bms_packs
    return parts


def decode(
    fields: dict[str, Any],
    cms: dict[str, Any] | None = None,
    bms_packs: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Columns and per-pack SoCs from display/runtime fields, a CMS status and BMS heartbeats
    (TABLE: only the rules the message reaches run)."""
    return TABLE.decode(with_parts(fields, cms, bms_packs))
