"""`python -m collector decode [--topic T] [--rows] PATH`: show what the collector would store.

PATH may be one payload: a JSON payload, a fixture file (`payload` / `payload_hex` /
`payload_b64`; a `payload_kind` naming "inner pdata" plus a `header` when only the inner
message was captured), or a binary payload given raw, as hex or as base64. Prints the
reading(s) it decodes to as JSON, or the reason it cannot be decoded (exit 1).

PATH may also hold several payloads: a directory (its files in name order), a JSON array of
payloads or fixtures, or JSON Lines (one payload or fixture a line). Then (and for one payload
with `--rows`) the payloads go in that order through the collector's own pipeline and
snapshot merge (collector.pipeline.Pipeline, the Writer's SnapshotMerger and its fold of
messages with the same device and time), and the rows it would write are printed, in order:
every column as stored, with `carried_over` naming the columns this row holds from an earlier
message (not reported by its own), `cleared` the columns its message set to "not applicable",
and `payloads` the input(s) the row came from. Inputs that would become dead letters are
printed with their reason in place; the exit status is 1 when there was one.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
from pathlib import Path
from typing import Any

from collector.decoders import DecodeError, decode
from collector.decoders.protobuf import header_message
from collector.decoders.registry import unmapped_reason
from collector.rows import VALUE_COLUMNS, HeadlineSoc

_HEX = re.compile(r"^(?:[0-9a-fA-F]{2})+$")


def payload_from_fixture(document: dict[str, Any]) -> tuple[bytes, str | None] | None:
    """The payload bytes and topic a fixture file describes, or None for a plain payload."""
    topic = document.get("topic") if isinstance(document.get("topic"), str) else None
    if "payload" in document:
        payload = document["payload"]
        # Some captures wrap EcoFlow's quota/all data map as {device_info, quota_all}.
        if isinstance(payload, dict) and isinstance(payload.get("quota_all"), dict):
            payload = payload["quota_all"]
        return json.dumps(payload).encode(), topic
    for key, convert in (("payload_hex", bytes.fromhex), ("payload_b64", base64.b64decode)):
        if isinstance(document.get(key), str):
            data = convert(document[key])
            inner_only = "inner pdata" in str(document.get("payload_kind", "")).lower()
            if inner_only and isinstance(document.get("header"), dict):
                # Inner pdata only: put it back into a header. Such captures are logged after
                # the XOR was undone, so the header must not ask for it again.
                header = {k: v for k, v in document["header"].items()
                          if k not in ("encType", "enc_type")}
                data = header_message(header, data)
            return data, topic
    return None


def load_payload(path: Path) -> tuple[bytes, str | None]:
    """Bytes to decode from FILE (and the topic a fixture file records)."""
    data = path.read_bytes()
    text = data.strip()
    try:
        document = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        document = None
    if isinstance(document, dict):
        fixture = payload_from_fixture(document)
        if fixture is not None:
            return fixture
        return data, None
    if _HEX.match(text.decode("ascii", errors="replace")):
        return bytes.fromhex(text.decode("ascii")), None
    # Base64 text and raw binary go to the decoder as they are: it recognises both.
    return data, None


def load_payloads(path: Path) -> list[tuple[str, bytes, str | None]] | None:
    """(label, bytes, fixture topic) of every payload in a directory or a file of several
    (a JSON array, or JSON Lines), in order; None for a file holding one payload."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        return [(p.name, *load_payload(p)) for p in files]
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    try:
        document = json.loads(text)
    except ValueError:
        document = None
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) < 2:
            return None
        try:
            documents = [json.loads(line) for line in lines]
        except ValueError:
            return None
    else:
        if not isinstance(document, list):
            return None
        documents = document
    payloads = []
    for i, item in enumerate(documents, 1):
        label = f"{path.name}#{i}"
        fixture = payload_from_fixture(item) if isinstance(item, dict) else None
        if fixture is None:
            payloads.append((label, json.dumps(item).encode(), None))
        else:
            payloads.append((label, *fixture))
    return payloads


def stored_rows(payloads: list[tuple[str, bytes, str | None]], topic: str | None = None,
                source: str | None = None) -> list[dict[str, Any]]:
    """The rows the collector would write for `payloads` received in this order, through its
    own Pipeline and Writer (snapshot merge and fold; nothing is written): one dict per row
    or dead letter, in the order the writer would store them."""
    from datetime import datetime, timezone

    from collector.pipeline import Pipeline
    from collector.writer import Writer, _fold

    class DryWriter(Writer):
        """The real Writer's queueing and snapshot merge, never connected to a database."""

        def __init__(self) -> None:
            super().__init__("", max_buffer=2**62)
            self.label = ""
            self.queued: list = []  # rows and dead letters, as queued
            self.own: dict[int, dict] = {}  # id(row) -> the values its own message set
            self.labels: dict[int, str] = {}

        def add_rows(self, rows, on_commit=None) -> None:
            for row in rows:
                self.own[id(row)] = dict(row.values)
                self.labels[id(row)] = self.label
            super().add_rows(rows)
            self.queued += rows

        def add_error(self, error, on_commit=None) -> None:
            self.queued.append((self.label, error))

    writer = DryWriter()
    pipeline = Pipeline(writer)
    for label, payload, fixture_topic in payloads:
        writer.label = label
        received_at = datetime.now(timezone.utc)
        row_source = source
        if row_source is None:  # the source decode guesses, as the collector's sources know
            try:
                row_source = next((r.source for r in decode(
                    payload, topic=topic or fixture_topic) if r.source), None)
            except Exception:  # noqa: BLE001 (the pipeline below reports it as a dead letter)
                row_source = None
        pipeline.handle(payload, topic or fixture_topic, row_source or "bridge",
                        received_at=received_at)
    rows = [item for item in writer.queued if not isinstance(item, tuple)]
    # One row per device and time, as the writer folds them: a later message with the same
    # device and time is merged into the row, which keeps the first one's place.
    final = {(row.device_sn, row.ts): row for row in _fold(rows)}
    out: list[dict[str, Any]] = []
    for item in writer.queued:
        if isinstance(item, tuple):
            label, error = item
            out.append({"payloads": [label], "dead_letter": error.error,
                        "device_sn": error.device_sn})
            continue
        row = final.pop((item.device_sn, item.ts), None)
        if row is None:  # already printed in its place, or a redelivery the writer skips
            continue
        parts = [*(row.merged or ()), row]
        own: dict[str, Any] = {}
        for part in parts:
            own.update(writer.own[id(part)])
        out.append({
            "payloads": [writer.labels[id(part)] for part in parts],
            "device_sn": row.device_sn,
            "ts": row.ts.isoformat(),
            "received_at": row.received_at.isoformat() if row.received_at else None,
            "source": row.source,
            "model": row.model,
            "values": {column: row.values.get(column) for column in VALUE_COLUMNS},
            # A headline SoC stands in for soc_min_percent only while no pack is known: when
            # the snapshot keeps a pack's lower SoC instead, that value is carried over.
            "carried_over": [c for c in VALUE_COLUMNS if row.values.get(c) is not None and (
                c not in own or (type(own[c]) is HeadlineSoc and own[c] != row.values[c]))],
            "cleared": [c for c in VALUE_COLUMNS if c in own and own[c] is None],
        })
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the decode command; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m collector decode",
        description="Decode captured EcoFlow payloads: what one decodes to, or the rows the "
                    "collector would write for several.",
    )
    parser.add_argument("--topic", help="MQTT topic the payload arrived on (gives the serial)")
    parser.add_argument("--source", help="rest, open_mqtt, app_mqtt or bridge (default: guessed)")
    parser.add_argument("--rows", action="store_true",
                        help="print the rows the collector would write, also for one payload")
    parser.add_argument("file", type=Path,
                        help="payload file (JSON, fixture, raw, hex or base64), a file of several"
                             " (JSON array or JSON Lines), or a directory of payload files")
    args = parser.parse_args(argv)

    try:
        several = load_payloads(args.file)
        if several is None and args.rows:
            several = [(args.file.name, *load_payload(args.file))]
    except OSError as exc:
        print(f"cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    except (ValueError, binascii.Error) as exc:
        print(json.dumps({"error": f"fixture payload is not valid hex/base64: {exc}"}))
        return 1
    if several is not None:
        rows = stored_rows(several, args.topic, args.source)
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 1 if any("dead_letter" in row for row in rows) else 0
    try:
        payload, fixture_topic = load_payload(args.file)
    except OSError as exc:
        print(f"cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    except (ValueError, binascii.Error) as exc:
        print(json.dumps({"error": f"fixture payload is not valid hex/base64: {exc}"}))
        return 1
    try:
        readings = decode(payload, topic=args.topic or fixture_topic, source=args.source)
    except DecodeError as exc:
        print(json.dumps({"error": str(exc)}, indent=2))
        return 1
    printed = []
    for reading in readings:
        entry = reading.to_json()
        reason = unmapped_reason(reading)
        if reason:
            entry["unmapped"] = reason  # stored raw, no column guessed
        printed.append(entry)
    print(json.dumps(printed, indent=2, ensure_ascii=False))
    return 0
