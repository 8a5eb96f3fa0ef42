"""The `ecoflow-export` command line (docs/export.md)."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date, datetime, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg

from exporter.export import BATCH_ROWS, FORMATS, WHAT, ExportError, Progress, export
from servicekit import reader
from servicekit.logging import redact
from servicekit.settings import SettingsError, database_settings

PROGRESS_EVERY_SEC = 2.0

EPILOG = """\
The range is from inclusive, to exclusive. A date or a time without an offset is taken in
--timezone (default UTC), which also decides where the days of daily-energy begin.
Database: DATABASE_URL, or the read-only role (POSTGRES_READONLY_USER and
POSTGRES_READONLY_PASSWORD) on POSTGRES_HOST, POSTGRES_PORT, POSTGRES_DB. See docs/export.md.
"""


def parse_time(flag: str, value: str, tz: ZoneInfo) -> datetime:
    """An ISO 8601 date or date-time; naive values are in `tz`."""
    try:
        if "T" not in value and " " not in value.strip():
            parsed = datetime.combine(date.fromisoformat(value), time())
        else:
            parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ExportError(f"{flag} {value!r}: not an ISO 8601 date or time (use e.g. 2024-05-01, "
                          "2024-05-01T12:00 or 2024-05-01T12:00:00+02:00)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=tz)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecoflow-export", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export one station's readings, outages or daily energy as CSV or Parquet.")
    parser.add_argument("--device", required=True, metavar="SN", help="the station's serial")
    parser.add_argument("--from", dest="start", required=True, metavar="ISO",
                        help="start of the range (inclusive)")
    parser.add_argument("--to", dest="end", required=True, metavar="ISO",
                        help="end of the range (exclusive)")
    parser.add_argument("--format", choices=FORMATS, default="csv")
    parser.add_argument("--what", choices=WHAT, default="readings")
    parser.add_argument("--output", "-o", default="-", metavar="FILE",
                        help="where to write; - (the default) for standard output")
    parser.add_argument("--timezone", default="UTC", metavar="ZONE",
                        help="IANA zone for naive times, CSV timestamps and energy days")
    parser.add_argument("--with-raw", action="store_true",
                        help="readings: add the raw payload (JSON text) as a last column")
    parser.add_argument("--batch-rows", type=int, default=BATCH_ROWS, metavar="N",
                        help=f"Parquet: rows per batch and row group (default {BATCH_ROWS})")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    parser.add_argument("--database-url", metavar="URL",
                        help="overrides DATABASE_URL and the POSTGRES_* variables")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        try:
            tz = ZoneInfo(args.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ExportError(f"--timezone {args.timezone}: unknown time zone (use an IANA name "
                              "such as Europe/Berlin, or UTC)") from None
        start = parse_time("--from", args.start, tz)
        end = parse_time("--to", args.end, tz)
        if end <= start:
            raise ExportError("--to must be later than --from (the range is from inclusive, "
                              "to exclusive)")
        if args.batch_rows < 1:
            raise ExportError("--batch-rows must be at least 1")
        if args.format == "parquet" and args.output == "-" and sys.stdout.isatty():
            raise ExportError("--output: Parquet is binary; name a file or redirect stdout")
        url = args.database_url or reader.reader_url(database_settings())
    except (ExportError, SettingsError) as exc:
        parser.exit(2, f"ecoflow-export: {exc}\n")
    try:
        with reader.connect(url) as conn:
            return _run(conn, args, start, end, parser)
    except psycopg.OperationalError as exc:
        parser.exit(1, f"ecoflow-export: cannot reach the database: {redact(str(exc))}\n")


def _run(conn, args, start, end, parser) -> int:
    # --quiet: an interval no export reaches.
    progress = Progress(every=float("inf") if args.quiet else PROGRESS_EVERY_SEC)
    to_stdout = args.output == "-"
    path = args.output
    part = f"{path}.part"
    out = sys.stdout.buffer if to_stdout else open(part, "wb")  # noqa: SIM115
    try:
        stats = export(conn, out, what=args.what, device=args.device, start=start, end=end,
                       fmt=args.format, timezone=args.timezone, with_raw=args.with_raw,
                       batch_rows=args.batch_rows, progress=progress)
    except ExportError as exc:
        _discard(out, part, to_stdout)
        parser.exit(2, f"ecoflow-export: {exc}\n")
    except BaseException:
        _discard(out, part, to_stdout)
        raise
    if not to_stdout:
        out.close()
        os.replace(part, path)
    if not args.quiet and not to_stdout:
        print(f"ecoflow-export: {stats.rows:,} rows to {path}", file=sys.stderr)
    return 0


def _discard(out, part: str, to_stdout: bool) -> None:
    if not to_stdout:
        out.close()
        os.unlink(part)


if __name__ == "__main__":
    sys.exit(main())
