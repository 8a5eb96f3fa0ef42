"""Per-pack battery health (SoH, cycles, capacities, cell voltage and temperature range) from a decoded reading.

What the stations report about each battery pack, as they report it (docs/battery-health.md):

| family | pack | keys |
| --- | --- | --- |
| Delta 2 / River 2 (`delta_gen2`) | `master`, `slave1` | `bms_bmsStatus.` / `bms_slave.` + `soh`, `cycles`, `fullCap`, `designCap`, `minCellVol`, `maxCellVol`, `minCellTemp`, `maxCellTemp` |
| Delta Pro / Max (`delta_gen1`) | `master`, `slave1`, `slave2` | the same names under `bmsMaster.`, `bmsSlave1.`, `bmsSlave2.` |
| River / Pro / Max (`river_gen1`) | `master`, `slave1` | under `bmsMaster.`, `bmsSlave1.` (no `soh` or `designCap` in their captures) |
| gen 3, Stream (protobuf) | `pack<num>` | BMS heartbeat (32/50, `num`): `designCap` 11, `fullCap` 13, `cycles` 14, and whatever else of the list above our schema carries |
| gen 3 display / runtime, Delta Pro 3 REST | `bms` | `bmsBattSoh`, `bmsDesignCap`, `bmsFullCap` (runtime 247), `bmsMinCellVol`, `bmsMaxCellVol`, `bmsMinCellTemp`, `bmsMaxCellTemp` |

`bms` is the station's own BMS summary, not one pack: a Delta 3 reported `bmsDesignCap` 40000
and `bmsFullCap` 40000 beside BMS heartbeats of two packs of 20000 mAh each, where a River 3
Plus reported 12800 beside two packs of 12800.

Nothing is derived or filled in: a value the message does not carry is None, and a message
that carries none of them gives no PackHealth. Values outside what a pack can report (an SoH
of 0 or above 100, a capacity or cell voltage of 0) are the station saying "not measured"
and are left out too.

This runs on the Reading the registry already made (its `raw`: the JSON document, or the
protobuf headers decoded with our schema), so the decoders themselves are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .json_envelopes import unwrap
from .reading import Reading, number

# Families whose JSON key maps carry pack health, and where: key prefix -> pack name (the
# names the families' soc_modules use).
_JSON_PACKS: dict[str, dict[str, str]] = {
    "delta_gen2": {"bms_bmsStatus.": "master", "bms_slave.": "slave1"},
    "delta_gen1": {"bmsMaster.": "master", "bmsSlave1.": "slave1", "bmsSlave2.": "slave2"},
    "river_gen1": {"bmsMaster.": "master", "bmsSlave1.": "slave1"},
}

# The BMS's own names (gen-1, gen-2 JSON after the prefix; gen-3 BMS heartbeat JSON names).
_BMS_KEYS = {
    "soh_percent": "soh",
    "cycles": "cycles",
    "full_cap_mah": "fullCap",
    "design_cap_mah": "designCap",
    "cell_mv_min": "minCellVol",
    "cell_mv_max": "maxCellVol",
    "temp_c_min": "minCellTemp",
    "temp_c_max": "maxCellTemp",
}

# Gen-3 display / runtime fields of the station's BMS summary (bare camelCase, REST and
# protobuf alike).
_GEN3_MAIN_KEYS = {
    "soh_percent": "bmsBattSoh",
    "cycles": "bmsCycles",
    "full_cap_mah": "bmsFullCap",
    "design_cap_mah": "bmsDesignCap",
    "cell_mv_min": "bmsMinCellVol",
    "cell_mv_max": "bmsMaxCellVol",
    "temp_c_min": "bmsMinCellTemp",
    "temp_c_max": "bmsMaxCellTemp",
}
GEN3_SUMMARY = "bms"
_GEN3_MESSAGES = frozenset({"DisplayPropertyUpload", "RuntimePropertyUpload"})

# A JSON payload without any of these words carries no pack health: it is not unwrapped again.
# Plain substring tests: a regular expression with these alternatives cost 10 us per push,
# more than decoding it (the engine finds no literal to skip ahead with).
_HINTS = ("soh", "Soh", "cycles", "Cycles", "fullCap", "FullCap", "designCap", "DesignCap",
          "CellVol", "CellTemp")


def _hinted(text: str) -> bool:
    for hint in _HINTS:
        if hint in text:
            return True
    return False

_INT_MAX = 2**31 - 1  # PostgreSQL integer


@dataclass(frozen=True, slots=True)
class PackHealth:
    """One pack's health as one message reported it; None: not in this message."""

    pack: str
    soh_percent: float | None = None
    cycles: int | None = None
    full_cap_mah: int | None = None
    design_cap_mah: int | None = None
    cell_mv_min: int | None = None
    cell_mv_max: int | None = None
    temp_c_min: float | None = None
    temp_c_max: float | None = None

    def values(self) -> tuple:
        """The health columns in battery_packs order (after device_sn, pack and ts)."""
        return (self.soh_percent, self.cycles, self.full_cap_mah, self.design_cap_mah,
                self.cell_mv_min, self.cell_mv_max, self.temp_c_min, self.temp_c_max)


COLUMNS = tuple(f.name for f in fields(PackHealth))[1:]


def _soh(value: Any) -> float | None:
    n = number(value)
    return float(n) if n is not None and 0 < n <= 100 else None


def _count(value: Any) -> int | None:
    n = number(value)
    return int(n) if n is not None and n == int(n) and 0 <= n <= _INT_MAX else None


def _positive(value: Any) -> int | None:
    n = _count(value)
    return n if n else None


def _temp(value: Any) -> float | None:
    n = number(value)
    return float(n) if n is not None and -60 <= n <= 150 else None


_CHECK = {"soh_percent": _soh, "cycles": _count, "full_cap_mah": _positive,
          "design_cap_mah": _positive, "cell_mv_min": _positive, "cell_mv_max": _positive,
          "temp_c_min": _temp, "temp_c_max": _temp}


def pack_health(pack: str, get, names: dict[str, str]) -> PackHealth | None:
    """The PackHealth `get(key)` reports under `names` (column -> key), or None when it
    reports none of them."""
    found = {column: _CHECK[column](get(key)) for column, key in names.items()}
    if all(v is None for v in found.values()):
        return None
    return PackHealth(pack, **found)


def from_fields(family: str, fields: dict[str, Any]) -> list[PackHealth]:
    """Pack health from a flat JSON key map of `family` (as the registry unwraps it)."""
    result = []
    if family == "gen3":
        main = pack_health(GEN3_SUMMARY, fields.get, _GEN3_MAIN_KEYS)
        return [main] if main else []
    for prefix, name in _JSON_PACKS.get(family, {}).items():
        health = pack_health(name, lambda k, p=prefix: fields.get(p + k), _BMS_KEYS)
        if health:
            result.append(health)
    return result


def from_protobuf(raw: dict[str, Any]) -> list[PackHealth]:
    """Pack health from the decoded headers of a protobuf Reading's raw data."""
    result: dict[str, PackHealth] = {}
    main: dict[str, Any] = {}
    for header in raw.get("headers") or ():
        message, content = header.get("message"), header.get("pdata")
        if not isinstance(content, dict):
            continue
        if message == "BmsHeartbeat":
            num = _count(content.get("num")) or 0
            health = pack_health(f"pack{num}", content.get, _BMS_KEYS)
            if health:
                result[health.pack] = health
        elif message in _GEN3_MESSAGES:
            main.update(content)
    if main:
        health = pack_health(GEN3_SUMMARY, main.get, _GEN3_MAIN_KEYS)
        if health:
            result[GEN3_SUMMARY] = health
    return list(result.values())


def from_reading(reading: Reading) -> list[PackHealth]:
    """Every pack's health the reading's payload reports, by pack; [] for none."""
    raw = reading.raw
    if not isinstance(raw, dict):
        return []
    if raw.get("format") == "protobuf":
        return from_protobuf(raw)
    if reading.family not in _JSON_PACKS and reading.family != "gen3":
        return []
    if reading.raw_json is not None and not _hinted(reading.raw_json):
        return []
    return from_fields(reading.family, unwrap(raw).fields)
