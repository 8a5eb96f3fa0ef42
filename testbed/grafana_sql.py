"""Expand Grafana's PostgreSQL macros so that panel SQL can run directly against the database."""

from __future__ import annotations

import re
from datetime import datetime


def _ts(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value.utcoffset() is not None else value.isoformat()


def expand(sql: str, time_from: datetime, time_to: datetime) -> str:
    """Expand `$__timeFilter(col)`, `$__timeFrom()` and `$__timeTo()` as Grafana does."""
    frm, to = f"'{_ts(time_from)}'", f"'{_ts(time_to)}'"
    sql = re.sub(r"\$__timeFilter\(\s*([^)]+?)\s*\)", rf"\1 BETWEEN {frm} AND {to}", sql)
    sql = sql.replace("$__timeFrom()", frm).replace("$__timeTo()", to)
    if "$__" in sql:
        raise ValueError(f"unexpanded Grafana macro in: {sql[:200]}")
    return sql
