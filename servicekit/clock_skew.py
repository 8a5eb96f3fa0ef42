"""Each station's clock skew: how far its own timestamps (`ts`) run from when the collector
received its readings (`received_at`), as `ecoflow-collector doctor`, `ecoflow-policy status`
and the collector-health dashboard show it.

Skew is the device's clock minus the receive time, the median over the station's last
readings (up to 100 from the last day that carry a receive time): positive, the station's
clock runs ahead; a second or two negative is the delivery delay. A stamp more than
collector.pipeline.MAX_CLOCK_AHEAD ahead of its receipt is not believed and stored at the
receive time, as are readings whose payload has no device time (open MQTT, gen-3 protobuf):
`on_receipt` counts those, whose skew is 0 by construction.
"""

from __future__ import annotations

import psycopg

SKEW_SQL = """
SELECT d.device_sn, d.name, s.readings, s.skew_sec, s.min_sec, s.max_sec, s.on_receipt,
       s.last_received
  FROM devices d
  CROSS JOIN LATERAL (
        SELECT count(*)::int AS readings,
               percentile_cont(0.5) WITHIN GROUP (
                   ORDER BY extract(epoch FROM r.ts - r.received_at))::float8 AS skew_sec,
               min(extract(epoch FROM r.ts - r.received_at))::float8 AS min_sec,
               max(extract(epoch FROM r.ts - r.received_at))::float8 AS max_sec,
               count(*) FILTER (WHERE r.ts = r.received_at)::int AS on_receipt,
               max(r.received_at) AS last_received
          FROM (SELECT m.ts, m.received_at
                  FROM ecoflow_measurements m
                 WHERE m.device_sn = d.device_sn
                   AND m.received_at IS NOT NULL
                   AND m.ts BETWEEN now() - interval '1 day' AND now() + interval '1 day'
                 ORDER BY m.ts DESC
                 LIMIT 100) r) s
 WHERE s.readings > 0
 ORDER BY coalesce(d.name, d.device_sn), d.device_sn
"""

# Beyond this the skew is worth a look: the policy copes with any offset (it measures age by
# receipt), but a clock this far off shifts every `ts` in Grafana and in exports.
NOTABLE_SEC = 60


def station_skews(conn: psycopg.Connection) -> list[dict]:
    """One dict per station with recent readings: device_sn, name, readings, skew_sec (the
    median), min_sec, max_sec, on_receipt, last_received."""
    with conn.cursor() as cur:
        cur.execute(SKEW_SQL)
        names = [c.name for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def describe(row: dict) -> str:
    """'clock 3 h 0 min behind (median of 100 readings)' and the like."""
    skew = row["skew_sec"]
    if row["on_receipt"] == row["readings"]:
        return (f"no device time: all {row['readings']} recent readings are stamped on receipt"
                " (no timestamp in the payload, or one more than 5 min ahead)")
    size = abs(skew)
    if size < 1:
        text = f"clock in step with receipt (within 1 s, median of {row['readings']} readings"
        if row["on_receipt"]:
            text += f"; {row['on_receipt']} stamped on receipt"
        return text + ")"
    if size < 120:
        amount = f"{size:.0f} s"
    elif size < 7200:
        amount = f"{size / 60:.0f} min"
    else:
        amount = f"{int(size // 3600)} h {int(size % 3600 // 60)} min"
    where = "ahead of" if skew > 0 else "behind"
    text = f"clock {amount} {where} receipt (median of {row['readings']} readings"
    if row["on_receipt"]:
        text += f"; {row['on_receipt']} stamped on receipt"
    return text + ")"
