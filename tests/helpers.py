"""Small helpers for tests that insert readings."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

COLUMNS = (
    "ts", "device_sn", "soc_percent", "soc_min_percent", "remain_time_min", "watts_in_sum",
    "watts_out_sum", "ac_in_watts", "ac_out_watts", "dc_out_watts", "typec_out_watts",
    "usb_out_watts", "pv_in_watts", "grid_connected", "battery_temp_c", "source", "raw_data",
)


def insert_reading(conn, ts: datetime, device_sn: str, **values) -> None:
    row = {"source": "simulator", "raw_data": {}, **values, "ts": ts, "device_sn": device_sn}
    row["raw_data"] = json.dumps(row["raw_data"])
    cols = [c for c in COLUMNS if c in row]
    conn.execute(
        f"INSERT INTO ecoflow_measurements ({', '.join(cols)}) VALUES "
        f"({', '.join('%s' for _ in cols)})",
        [row[c] for c in cols],
    )


def insert_series(conn, device_sn: str, start: datetime, count: int, step: timedelta, **values):
    """`count` readings `step` apart; a callable value is called with the reading's index."""
    with conn.cursor() as cur:
        for i in range(count):
            row = {k: (v(i) if callable(v) else v) for k, v in values.items()}
            insert_reading(cur, start + i * step, device_sn, **row)
