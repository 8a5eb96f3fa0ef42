"""What a decoder returns: the Reading dataclass, DecodeError and the unit helpers all families share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from collector.rows import HeadlineSoc

# The ecoflow_measurements columns a payload can determine (DESIGN.md "Database contract").
COLUMNS = (
    "soc_percent",
    "soc_min_percent",
    "remain_time_min",
    "watts_in_sum",
    "watts_out_sum",
    "ac_in_watts",
    "ac_out_watts",
    "dc_out_watts",
    "typec_out_watts",
    "usb_out_watts",
    "pv_in_watts",
    "grid_connected",
    "battery_temp_c",
)

# Remaining-time values EcoFlow uses for "not applicable" (not charging / not discharging):
# 143999 (99 d 23 h 59 min) on Delta 3 / Delta Pro / Delta Pro Ultra X captures.
REMAIN_TIME_SENTINELS = frozenset({5999, 5939, 143999})

# AC-in voltage above this means the grid is there; below it is sensor noise.
GRID_PRESENT_VOLTS = 50.0

# AC-in power above this is the grid flowing in, whatever the voltage field says; below it is
# sensor noise (PROTOCOL.md `grid_connected`: "above about 5 W").
GRID_INFLOW_WATTS = 5

# Families known to show "ghost voltage" (AC-in voltage with no power and no flag), on which
# voltage alone is not proof of grid (PROTOCOL.md). None of our captures shows it: the Delta 2
# capture with 230 V and 0 W in is a station on grid holding its charge limit.
GHOST_VOLTAGE_FAMILIES: frozenset[str] = frozenset()


class _Cleared:
    """What a family decoder returns for a column the payload says does not apply now (a
    remaining time of 5999 while charging): `finish` turns it into a None value, which the
    collector stores as NULL from then on (collector.rows.SnapshotMerger)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "CLEARED"

    def __reduce__(self) -> str:
        return "CLEARED"


CLEARED = _Cleared()

_isfinite = math.isfinite
# Integers a double holds exactly: for these, int(round(n * 1.0)) is n.
_EXACT = 2**53

# Epoch seconds between 2017 and 2100: anything else in a timestamp field is not wall-clock time
# (the open MQTT `time` field, for one, counts something else).
_EPOCH_MIN, _EPOCH_MAX = 1_483_228_800, 4_102_444_800


class DecodeError(ValueError):
    """A payload that cannot be decoded; str(error) says why, for ingest_errors and the CLI."""


@dataclass(slots=True)
class Reading:
    """One decoded payload: the columns it determines, nothing it does not.

    values: only DESIGN.md columns this payload determines; a missing key means unknown (the
        collector fills it from the device's last known state), never 0 or false. A key whose
        value is None is cleared: the payload says the column does not apply now (a "not
        applicable" sentinel such as a remaining time of 5999), and the collector stores NULL
        for it instead of the last known value. soc_min_percent is a HeadlineSoc when it is
        only the headline SoC (no pack in the payload).
    soc_modules: per-pack SoC (percent) by pack name, for soc_min and the normalized MQTT state.
    raw: the JSON as received, or the protobuf decoded with our schema (MessageToDict).
    online: False for an "offline" reply (then values is empty), True when the payload says the
        device is online, None when it does not say.
    """

    device_sn: str | None
    ts: datetime | None
    values: dict[str, Any]
    raw: dict[str, Any]
    family: str
    model: str | None = None
    soc_modules: dict[str, float] = field(default_factory=dict)
    online: bool | None = None
    source: str | None = None
    # The JSON text `raw` was parsed from, when the payload was JSON: the writer stores it as
    # it came instead of serializing `raw` again.
    raw_json: str | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (ISO timestamp), as the decode command prints it."""
        return {
            "device_sn": self.device_sn,
            "ts": self.ts.isoformat() if self.ts else None,
            "family": self.family,
            "model": self.model,
            "source": self.source,
            "online": self.online,
            "values": dict(self.values),
            "soc_modules": dict(self.soc_modules),
            "raw": self.raw,
        }


def number(value: Any) -> float | None:
    """A finite number from a JSON or protobuf value; None for anything else (bools included)."""
    # Exact types first: this runs a score of times for every payload.
    cls = type(value)
    if cls is int:
        return value
    if cls is float:
        return value if _isfinite(value) else None
    if value is None or cls is bool or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not _isfinite(value):
        return None
    return value


def watts(value: Any, scale: float = 1.0) -> int | None:
    """A power reading as whole watts; `scale` converts units such as 0.1 W."""
    if value is None:
        return None
    if type(value) is int and scale == 1.0 and -_EXACT <= value <= _EXACT:
        return value  # what the rounding below gives: the common case, kept short
    n = number(value)
    return None if n is None else int(round(n * scale))


def out_watts(value: Any, scale: float = 1.0) -> int | None:
    """An output power as a magnitude: gen-3 reports outflow as a negative float."""
    if value is None:
        return None
    w = watts(value, scale)
    return None if w is None else abs(w)


def percent(value: Any) -> float | None:
    """A state of charge in percent (0..100), rounded to 0.01; None when out of range."""
    cls = type(value)
    if cls is float and 0.0 <= value <= 100.0:  # NaN fails the comparison
        return round(value, 2)
    if cls is int and 0 <= value <= 100:
        return float(value)  # what the rounding below gives
    n = number(value)
    if n is None or not 0 <= n <= 100:
        return None
    return round(float(n), 2)


def remain_minutes(value: Any, charging: bool = False) -> int | _Cleared | None:
    """Minutes of runtime left; CLEARED for the "not applicable" sentinels (5999, 5939, and 0
    while the same message says the battery is charging); None for nonsense or nothing."""
    n = number(value)
    if n is None or n < 0:
        return None
    if int(n) in REMAIN_TIME_SENTINELS or (n == 0 and charging):
        return CLEARED
    return int(round(n))


def sum_all(values: list[int | None]) -> int | None:
    """Sum of port powers, only when every port is known: a partial sum would be a wrong total."""
    if not values or None in values:
        return None
    return sum(values)  # type: ignore[arg-type]


def _flag(value: Any) -> float | None:
    if value is True or value is False:
        return int(value)
    return number(value)


def grid_from(
    ac_in_volts: float | None, ac_in_watts: float | None, *flags: Any,
    family: str | None = None,
) -> bool | None:
    """grid_connected by PROTOCOL.md's rule: AC-in power flowing in (above GRID_INFLOW_WATTS)
    is the grid whatever the voltage says; else the AC-in voltage (volts); else the AC-in /
    AC-charger flags, as weak evidence (any flag set: true; all reported flags 0: false); else
    None. On a GHOST_VOLTAGE_FAMILIES family a voltage with no power is not proof: the flags
    decide."""
    if ac_in_watts is not None and ac_in_watts > GRID_INFLOW_WATTS:
        return True
    if ac_in_volts is not None:
        if ac_in_volts <= GRID_PRESENT_VOLTS:
            return False
        if family not in GHOST_VOLTAGE_FAMILIES:
            return True
    reported = [f for f in map(_flag, flags) if f is not None]
    if reported:
        # Weak evidence: the AC-in flag has been seen 0 while 1701 W flowed in on AC.
        return any(f != 0 for f in reported)
    return None


def epoch_ts(value: Any) -> datetime | None:
    """A device timestamp (epoch seconds or milliseconds) as aware UTC; None when implausible."""
    n = number(value)
    if n is None:
        return None
    if n > _EPOCH_MAX:
        n = n / 1000
    if not _EPOCH_MIN <= n <= _EPOCH_MAX:
        return None
    return datetime.fromtimestamp(n, tz=timezone.utc)


def finish(values: dict[str, Any], soc_modules: dict[str, float]) -> dict[str, Any]:
    """Drop unknown (None) columns, turn CLEARED ones into None, and add soc_min_percent: the
    lowest pack SoC, else the headline SoC marked as HeadlineSoc (the collector keeps the
    lowest known pack over it)."""
    result = {k: (None if v is CLEARED else v) for k, v in values.items() if v is not None}
    return with_soc_min(result, soc_modules)


def with_soc_min(result: dict[str, Any], soc_modules: dict[str, float]) -> dict[str, Any]:
    """`result` with soc_min_percent added as `finish` describes it."""
    if soc_modules:
        result["soc_min_percent"] = min(soc_modules.values())
    elif result.get("soc_percent") is not None:
        result["soc_min_percent"] = HeadlineSoc(result["soc_percent"])
    return result


USB_KEYS = ("pd.usb1Watts", "pd.usb2Watts", "pd.qcUsb1Watts", "pd.qcUsb2Watts")
TYPEC_KEYS = ("pd.typec1Watts", "pd.typec2Watts")


def ports_sum(raw: list) -> int | None:
    # A missing port makes the sum unknown whatever the others say: skip converting them.
    return None if None in raw else sum_all([out_watts(v) for v in raw])


def pd_runtime_while_discharging(f) -> int | _Cleared | None:
    """Minutes to empty from a first-generation `pd.remainTime` (Delta and River), which is
    positive both ways: a runtime only while the same message gives out more than it takes in
    (`pd.wattsOutSum` > `pd.wattsInSum`), else minutes to full and CLEARED; the "not applicable"
    sentinels clear too; None when the direction is unknown."""
    remain = number(f("pd.remainTime"))
    if remain is None or remain < 0:
        return None
    if int(remain) in REMAIN_TIME_SENTINELS:
        return CLEARED
    watts_in, watts_out = number(f("pd.wattsInSum")), number(f("pd.wattsOutSum"))
    if watts_in is None or watts_out is None:
        return None  # the direction is unknown: the figure may be minutes to full
    return int(round(remain)) if watts_out > watts_in else CLEARED


def prefixed_packs(f, prefixes: dict[str, str]) -> dict[str, float]:
    """Per-pack SoCs from first-generation keys: pack name by key prefix (`bmsMaster.`: master),
    each pack's `f32ShowSoc`, else its `soc`."""
    packs: dict[str, float] = {}
    for prefix, name in prefixes.items():
        soc = percent(f(prefix + "f32ShowSoc", f(prefix + "soc")))
        if soc is not None:
            packs[name] = soc
    return packs
