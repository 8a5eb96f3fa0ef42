"""Expand Grafana's PostgreSQL macros and template variables so panel SQL runs as Grafana runs it.

Grafana prepares a panel's SQL in two steps, and so does `expand`:

1. the dashboard's template variables and the global interval variables (`$__interval`,
   `$__interval_ms`, `$__unixEpochFrom()`, `$__unixEpochTo()`) are substituted as text; a
   multi-value variable becomes a comma-separated list of quoted literals, a single value is
   inserted as it is (with quotes doubled), as the SQL data sources format them. A variable
   whose query found nothing is an empty list when multi-value (its "All" included: Grafana
   joins the options' values, and there are none), so it becomes no text at all and
   `IN ($var)` turns into the syntax error Grafana shows; a single-value one is `""`;
2. the PostgreSQL data source's macros (`$__timeFilter`, `$__timeGroup`, `$__timeGroupAlias`,
   `$__time`, `$__unixEpochGroup`, ...) are replaced, with `time_bucket()` for `$__timeGroup`
   when the data source has TimescaleDB enabled, as Grafana's own macro engine does.

Anything left that looks like a macro or a variable is an error, so a panel never silently
depends on something that is not defined.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone

VariableValue = str | int | float | Sequence[str]

# Grafana's interval units (gtime.ParseInterval): a month is 30 days, a year 365.
_UNITS = {
    "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400,
    "M": 30 * 86400, "y": 365 * 86400,
}
# The steps Grafana rounds an automatic interval to (kbn.roundInterval), in seconds.
_NICE_STEPS = (
    0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900,
    1200, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 7 * 86400, 30 * 86400, 365 * 86400,
)
_MACRO = re.compile(r"\$(__[A-Za-z0-9_]+)\(([^)]*)\)")
_VARIABLE = re.compile(
    r"\$(?P<plain>[A-Za-z_]\w*)"
    r"|\[\[(?P<bracket>\w+?)(?::(?P<bracket_fmt>\w+))?\]\]"
    r"|\$\{(?P<braced>\w+)(?::(?P<braced_fmt>[^}]+))?\}"
)


def _ts(value: datetime) -> str:
    """A timestamp as Grafana writes it (UTC, RFC 3339 with trailing zeros trimmed)."""
    if value.utcoffset() is None:
        return value.isoformat()
    value = value.astimezone(timezone.utc)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_interval(text: str) -> timedelta:
    """`'5m'`, `1h`, `30s`, `100ms`... as Grafana parses interval arguments."""
    match = re.fullmatch(r"\s*'?(\d+(?:\.\d+)?)(ms|s|m|h|d|w|M|y)'?\s*", text)
    if not match:
        raise ValueError(f"not a Grafana interval: {text!r}")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def format_interval(interval: timedelta) -> str:
    """The text `$__interval` becomes: the largest whole unit (gtime.FormatInterval)."""
    ms = round(interval.total_seconds() * 1000)
    for unit, size in (("y", 365 * 86400), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if ms >= size * 1000:
            return f"{ms // (size * 1000)}{unit}"
    return f"{max(ms, 1)}ms"


def auto_interval(
    time_from: datetime,
    time_to: datetime,
    max_data_points: int = 1000,
    min_interval: timedelta = timedelta(seconds=10),
) -> timedelta:
    """The interval Grafana picks for a panel: range / data points, rounded to a nice step,
    never below the data source's minimum interval."""
    raw = (time_to - time_from).total_seconds() / max_data_points
    step = next((s for s in _NICE_STEPS if s >= raw), _NICE_STEPS[-1])
    return max(timedelta(seconds=step), min_interval)


def _go_float(value: float) -> str:
    """A float as Go's %v prints it for the values intervals take (300, 0.5)."""
    return str(int(value)) if value == int(value) else repr(value)


def _format_value(value: VariableValue, fmt: str | None) -> str:
    values = [str(v) for v in value] if isinstance(value, (list, tuple)) else None
    if fmt in (None, "sqlstring") or fmt == "":
        if values is not None:
            return ",".join("'" + v.replace("'", "''") + "'" for v in values)
        text = str(value).replace("'", "''")
        return f"'{text}'" if fmt == "sqlstring" else text
    if fmt == "raw":
        return ",".join(values) if values is not None else str(value)
    if fmt == "csv":
        return ",".join(values if values is not None else [str(value)])
    if fmt == "singlequote":
        items = values if values is not None else [str(value)]
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in items)
    if fmt == "doublequote":
        items = values if values is not None else [str(value)]
        return ",".join('"' + v.replace('"', '\\"') + '"' for v in items)
    raise ValueError(f"unsupported variable format :{fmt}")


def substitute_variables(sql: str, variables: Mapping[str, VariableValue]) -> str:
    """Replace `$name`, `${name}`, `${name:format}` and `[[name]]` for the given variables.

    A list value is a multi-value selection (quoted literals joined by commas); a string is a
    single value, inserted without quotes as Grafana's SQL data sources do.
    """

    def replace(match: re.Match) -> str:
        name = match.group("plain") or match.group("bracket") or match.group("braced")
        if name.startswith("__") or name not in variables:
            return match.group(0)
        fmt = match.group("bracket_fmt") or match.group("braced_fmt")
        return _format_value(variables[name], fmt)

    return _VARIABLE.sub(replace, sql)


def _time_group(args: list[str], timescaledb: bool) -> str:
    if len(args) < 2:
        raise ValueError("$__timeGroup needs a time column and an interval")
    seconds = parse_interval(args[1]).total_seconds()
    if timescaledb:
        return f"time_bucket('{seconds:.3f}s',{args[0]})"
    return f"floor(extract(epoch from {args[0]})/{_go_float(seconds)})*{_go_float(seconds)}"


def _macro(name: str, args: list[str], frm: datetime, to: datetime, timescaledb: bool) -> str:
    col = args[0] if args and args[0] else None
    if name in ("__time", "__timeEpoch", "__timeFilter", "__unixEpochFilter",
                "__unixEpochNanoFilter") and col is None:
        raise ValueError(f"${name} needs a column argument")
    f_s, t_s = int(frm.timestamp()), int(to.timestamp())
    f_ns, t_ns = f_s * 10**9 + frm.microsecond * 1000, t_s * 10**9 + to.microsecond * 1000
    if name == "__time":
        return f'{col} AS "time"'
    if name == "__timeEpoch":
        return f'extract(epoch from {col}) as "time"'
    if name == "__timeFilter":
        return f"{col} BETWEEN '{_ts(frm)}' AND '{_ts(to)}'"
    if name == "__timeFrom":
        return f"'{_ts(frm)}'"
    if name == "__timeTo":
        return f"'{_ts(to)}'"
    if name == "__timeGroup":
        return _time_group(args, timescaledb)
    if name == "__timeGroupAlias":
        return _time_group(args, timescaledb) + ' AS "time"'
    if name == "__unixEpochFilter":
        return f"{col} >= {f_s} AND {col} <= {t_s}"
    if name == "__unixEpochNanoFilter":
        return f"{col} >= {f_ns} AND {col} <= {t_ns}"
    if name == "__unixEpochNanoFrom":
        return str(f_ns)
    if name == "__unixEpochNanoTo":
        return str(t_ns)
    if name in ("__unixEpochGroup", "__unixEpochGroupAlias"):
        if len(args) < 2:
            raise ValueError(f"${name} needs a column and an interval")
        s = _go_float(parse_interval(args[1]).total_seconds())
        group = f"floor(({col})/{s})*{s}"
        return group + ' AS "time"' if name.endswith("Alias") else group
    raise ValueError(f"unknown Grafana macro ${name}")


def expand(
    sql: str,
    time_from: datetime,
    time_to: datetime,
    *,
    interval: timedelta | None = None,
    variables: Mapping[str, VariableValue] | None = None,
    timescaledb: bool = True,
) -> str:
    """Panel SQL as the PostgreSQL data source sends it to the server.

    `interval` is the panel's `$__interval` (default: what Grafana would pick for a 1000-point
    panel over the range); `variables` maps template variable names to their current value;
    `timescaledb` mirrors the data source's TimescaleDB switch.
    """
    if interval is None:
        interval = auto_interval(time_from, time_to)
    sql = sql.replace("$__interval_ms", str(round(interval.total_seconds() * 1000)))
    sql = sql.replace("$__interval", format_interval(interval))
    sql = sql.replace("$__unixEpochFrom()", str(int(time_from.timestamp())))
    sql = sql.replace("$__unixEpochTo()", str(int(time_to.timestamp())))
    sql = substitute_variables(sql, variables or {})

    def replace(match: re.Match) -> str:
        name, raw_args = match.group(1), match.group(2)
        # Like Grafana: `$__timeGroup(...)` directly followed by a comma is the pre-5.3 form
        # that also names the column "time".
        if name == "__timeGroup" and sql[match.end():match.end() + 1] == ",":
            name = "__timeGroupAlias"
        args = [a.strip() for a in raw_args.split(",")]
        return _macro(name, args, time_from, time_to, timescaledb)

    sql = _MACRO.sub(replace, sql)
    if "$__" in sql:
        raise ValueError(f"unexpanded Grafana macro in: {sql[:200]}")
    leftover = re.search(r"\$\{?[A-Za-z_]\w*|\[\[\w+\]\]", sql)
    if leftover:
        raise ValueError(f"undefined template variable {leftover.group(0)} in: {sql[:200]}")
    return sql
