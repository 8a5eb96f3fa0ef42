"""The row the collector stores: the database contract's columns, one complete snapshot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# Decoded columns of ecoflow_measurements, in table order (ts, device_sn, source, raw_data and
# received_at are set separately).
VALUE_COLUMNS = (
    "soc_percent", "soc_min_percent", "remain_time_min", "watts_in_sum", "watts_out_sum",
    "ac_in_watts", "ac_out_watts", "dc_out_watts", "typec_out_watts", "usb_out_watts",
    "pv_in_watts", "grid_connected", "battery_temp_c",
)
TABLE_COLUMNS = ("ts", "device_sn", *VALUE_COLUMNS, "source", "raw_data", "received_at")
_VALUE_SET = frozenset(VALUE_COLUMNS)
SOURCES = ("rest", "open_mqtt", "app_mqtt", "bridge", "nut", "simulator")
_REAL_COLUMNS = frozenset({"soc_percent", "soc_min_percent", "battery_temp_c"})
_INT_MAX = 2**31 - 1  # PostgreSQL integer


_INT_COLUMNS = frozenset(VALUE_COLUMNS) - _REAL_COLUMNS - {"grid_connected"}
_EXACT_DOUBLE_INT = 2**53


def binary_safe(column: str, value: Any) -> bool:
    """Whether the writer's binary COPY stores `value` exactly as the text COPY would (the
    column's own Python type: int for integer, bool for boolean, a number whose float4 is
    the one PostgreSQL parses from its text for real). Anything else takes the text COPY,
    so the database decides on it as it always has (refusing a float in an integer column)."""
    cls = type(value)
    if column in _INT_COLUMNS:
        return cls is int
    if column == "grid_connected":
        return cls is bool
    if cls is int:  # exact as a double, so rounded to float4 once, as from its digits
        return -_EXACT_DOUBLE_INT <= value <= _EXACT_DOUBLE_INT
    if cls is not float:
        return False
    # A double exactly halfway between two float4s rounds to even in binary, but its shortest
    # text may lie just off the halfway point and round the other way: keep the text there.
    half = math.frexp(value)[0] * 33554432.0  # the significand in 25 bits
    return not (half.is_integer() and int(half) & 1)


class HeadlineSoc(float):
    """A soc_min_percent that is only the headline SoC: the payload named no battery pack.

    Decoders mark their fallback with it (a float, so it reads, compares and serializes as
    one); the merger stores it only while the device has no known pack, so a message without
    pack data (emsStatus, pdStatus, a gen-3 CMS heartbeat) cannot replace the lowest pack SoC
    with the headline figure. A plain number is an explicit lowest SoC and is stored as given
    (NUT's 0 for a UPS that says its battery is done).
    """

    __slots__ = ()


def storable(column: str, value: Any) -> bool:
    """Whether the column's database type can hold the value. A reading outside it (a
    corrupted or misread field) is treated as not reported: stored, it would be refused, and
    merged into the snapshot it would be refused again in every later row of the device."""
    if value is True or value is False:
        return True
    if not isinstance(value, int | float):
        return False
    if column in _REAL_COLUMNS:  # real: finite, and not so small that it underflows
        return value == 0 or 1e-30 < abs(value) < 1e30
    return -_INT_MAX <= value <= _INT_MAX


@dataclass(slots=True)
class Row:
    ts: datetime
    device_sn: str
    source: str
    raw_data: dict[str, Any]
    values: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    # The payload's JSON text when raw_data is that text parsed: stored as it came, which
    # spares serializing raw_data again for every row.
    raw_json: str | None = None
    # Where the row came from, kept for `ingest_errors` should the database refuse the row.
    topic: str | None = None
    payload: bytes | None = None
    # When the collector received it, by the collector's clock: what the policy measures a
    # station's age with (SAFETY S1), whatever the station's own clock says. None: at `ts`.
    received_at: datetime | None = None
    # Earlier rows of the same device and time, with other payloads, that this row (the newest)
    # was merged over inside one batch: their payloads go to `ecoflow_merged_payloads`.
    merged: list[Row] | None = None
    # Every value suits the writer's binary COPY (`binary_safe`); set by the snapshot merge.
    binary: bool = False
    # What the payload reported about its battery packs (collector.decoders.pack_health
    # PackHealth): written to `battery_packs` with the row, at its time.
    packs: tuple = ()

    def as_tuple(self) -> tuple:
        return (self.ts, self.device_sn, *map(self.values.get, VALUE_COLUMNS),
                self.source, self.raw_data, self.received_at)


class SnapshotMerger:
    """Keeps each device's last known value of every column.

    EcoFlow sends partial messages (one module's keys at a time); a stored row carries the
    device's last known value for every column merged with the new message, so a reader of the
    latest row never sees a null SoC because the last message was an inverter update. A column
    that was never reported stays null.

    In the values merged, a column that is missing is unknown (the last known value stays); a
    column present with None is cleared: the device said "not applicable" (a remaining time of
    5999 while charging), so the snapshot drops the value and the column is null from this
    row on, until a real value arrives. soc_min_percent is the lowest SoC over every pack the
    device has reported (`merge_modules`); a HeadlineSoc stands in only while no pack is known.
    """

    def __init__(self) -> None:
        self._known: dict[str, dict[str, Any]] = {}
        self._modules: dict[str, dict[str, float]] = {}
        # Per device, the columns whose known value is not `binary_safe` (hardly ever any).
        self._odd: dict[str, set[str]] = {}

    def binary_safe(self, device_sn: str) -> bool:
        """Whether every known value of the device suits the writer's binary COPY."""
        return not self._odd.get(device_sn)

    def _note(self, device_sn: str, column: str, value: Any) -> None:
        odd = self._odd.get(device_sn)
        if value is not None and not binary_safe(column, value):
            if odd is None:
                odd = self._odd[device_sn] = set()
            odd.add(column)
        elif odd:
            odd.discard(column)

    def seed(self, device_sn: str, values: dict[str, Any]) -> None:
        """Fill in values stored earlier; what has arrived since start-up is newer and wins."""
        stored = {k: v for k, v in values.items() if k in _VALUE_SET and v is not None}
        known = self._known[device_sn] = {**stored, **self._known.get(device_sn, {})}
        for k, v in known.items():
            self._note(device_sn, k, v)

    def merge(self, device_sn: str, values: dict[str, Any]) -> dict[str, Any]:
        """The device's snapshot with `values` merged in: a new dict, the row's own."""
        known = self._known.get(device_sn)
        if known is None:
            known = self._known[device_sn] = {}
        for k, v in values.items():
            cls = type(v)
            # The common cases first: an integer or a boolean in a column of its own type.
            if (cls is int and k in _INT_COLUMNS) or (cls is bool and k == "grid_connected"):
                if cls is bool or -_INT_MAX <= v <= _INT_MAX:  # else not storable: unknown
                    known[k] = v
                    if self._odd:
                        self._note(device_sn, k, v)
                continue
            if cls is float and k in _REAL_COLUMNS and (v == 0 or 1e-30 < abs(v) < 1e30):
                # A storable float in a real column (storable() inlined): SoC and temperature.
                known[k] = v
                if self._odd or not binary_safe(k, v):
                    self._note(device_sn, k, v)
                continue
            if k not in _VALUE_SET:
                continue
            if v is None:
                known.pop(k, None)
                if self._odd:
                    self._note(device_sn, k, None)
                continue
            if type(v) is HeadlineSoc:
                packs = self._modules.get(device_sn)
                v = min(packs.values()) if packs else float(v)
            if storable(k, v):
                known[k] = v
                cls = type(v)
                if self._odd or not ((cls is int and k in _INT_COLUMNS)
                                     or (cls is bool and k == "grid_connected")
                                     or binary_safe(k, v)):
                    self._note(device_sn, k, v)
        return known.copy()

    def merge_modules(self, device_sn: str, modules: dict[str, float]) -> dict[str, float]:
        """Per-pack SoCs arrive in separate messages (master, then a slave pack): keep them all,
        so the lowest is taken over every pack, not just the ones in the latest message."""
        known = self._modules.setdefault(device_sn, {})
        known.update({k: v for k, v in modules.items() if v is not None})
        return dict(known)

