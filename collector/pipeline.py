"""Payload in, rows out: decode, complete the snapshot, queue for the writer, publish state.

Every payload ends as rows or as an `ingest_errors` entry; nothing is dropped silently. The
`on_commit` callback (the MQTT ack) runs once everything the payload produced is committed.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from collector.decoders import DecodeError, decode, sn_from_topic
from collector.decoders.pack_health import from_reading as pack_health
from collector.decoders.registry import unmapped_product
from collector.rows import Row
from collector.state_out import StateOut
from collector.writer import IngestError, Writer

log = logging.getLogger(__name__)

# A device clock further ahead than this is wrong; the receive time is used instead.
MAX_CLOCK_AHEAD = timedelta(minutes=5)

# Young-generation threshold of the cyclic garbage collector while the collector runs (see
# tune_gc; CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Make the cyclic garbage collector cheaper for the collector's steady state.

    Every message allocates a handful of short-lived containers (the parsed document, the
    values, the row) that reference counting frees; none forms a cycle. With CPython's defaults
    the collector still scans the young objects every 700 allocations and, now and then, every
    object in the process (the modules, the decoders' tables, the queued rows). Once the
    service is set up, its long-lived objects are frozen out of those scans and the young
    generation is collected every GC_YOUNG_THRESHOLD allocations: cycles are still collected,
    only less often.
    """
    gc.collect()  # garbage already in cycles is freed, not frozen with the rest
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)


class Pipeline:
    def __init__(self, writer: Writer, publish_state: Callable[[str, dict], None] | None = None,
                 metrics=None, state_interval: float = 1.0):
        self.writer = writer
        self.metrics = metrics
        self.names: dict[str, str] = {}
        self.state_interval = state_interval
        self.state_out: StateOut | None = None
        self._bugs_logged: set = set()  # decoder failures whose traceback was logged
        if publish_state:
            self.publish_states(publish_state)

    def publish_states(self, publish_state: Callable[[str, dict], None]) -> None:
        """Publish each device's normalized state with `publish_state(topic, state)`, at
        most once per `state_interval` per device (collector.state_out)."""
        self.publish_state = publish_state
        self.state_out = StateOut(self._publish, self.state_interval).start()

    def stop(self) -> None:
        if self.state_out is not None:
            self.state_out.stop()

    def handle(self, payload: bytes, topic: str | None, source: str,
               on_commit: Callable[[], None] | None = None,
               received_at: datetime | None = None, device_sn: str | None = None) -> int:
        """Decode one payload and queue what it produced; returns the number of rows queued.

        `device_sn` names the station when neither the topic nor the payload does (a REST
        answer for one serial number)."""
        received_at = received_at or datetime.now(timezone.utc)
        topic_sn = sn_from_topic(topic)
        if self.metrics:
            self.metrics.received(source)
        try:
            readings = decode(payload, topic=topic, source=source)
        except DecodeError as exc:
            return self.dead_letter(source, topic, payload, str(exc), topic_sn or device_sn,
                                    on_commit)
        except RecursionError:  # JSON nested deeper than Python's parser goes: the payload's fault
            return self.dead_letter(source, topic, payload, "JSON nested too deeply to decode",
                                    topic_sn or device_sn, on_commit)
        except Exception as exc:  # a decoder bug must not stop the collector or lose the bytes
            self._decoder_bug(exc, topic or source)
            return self.dead_letter(source, topic, payload, f"decoder error: {exc!r}",
                                    topic_sn or device_sn, on_commit)
        if device_sn:
            for reading in readings:
                reading.device_sn = reading.device_sn or device_sn
        return self._queue(readings, payload, topic, topic_sn, source, on_commit, received_at)

    def handle_readings(self, readings: list, payload: bytes, topic: str | None, source: str,
                        on_commit: Callable[[], None] | None = None,
                        received_at: datetime | None = None) -> int:
        """Queue readings a source decoded itself (e.g. NUT variables)."""
        return self._queue(readings, payload, topic, sn_from_topic(topic), source, on_commit,
                           received_at or datetime.now(timezone.utc))

    def _queue(self, readings: list, payload: bytes, topic: str | None, topic_sn: str | None,
               source: str, on_commit: Callable[[], None] | None,
               received_at: datetime) -> int:
        rows: list[Row] = []
        latest_ts = received_at + MAX_CLOCK_AHEAD
        for reading in readings:
            sn = reading.device_sn or topic_sn
            if not sn:
                return self.dead_letter(source, topic, payload,
                                        "no serial number in the topic or the payload", None,
                                        on_commit)
            if reading.online is False:
                log.info("%s reports device %s offline", source, sn)
                continue
            if reading.family == "unmapped" and self.metrics:
                self.metrics.unmapped(source, unmapped_product(reading))
            raw_json = reading.raw_json
            if raw_json is None:
                try:
                    raw_json = json.dumps(reading.raw, allow_nan=False, separators=(",", ":"))
                except (TypeError, ValueError, RecursionError):
                    raw_json = None
            if raw_json is None or "\\u0000" in raw_json:
                # PostgreSQL's jsonb refuses NaN, Infinity and \u0000: such a row would fail
                # its whole batch on every retry, so the payload goes to ingest_errors instead.
                return self.dead_letter(source, topic, payload, "payload holds NaN, Infinity or "
                                        "\\u0000, which PostgreSQL's jsonb cannot store", sn,
                                        on_commit)
            ts = reading.ts or received_at
            if ts > latest_ts:
                ts = received_at
            values = reading.values  # the reading's own dict, not used after this
            if reading.soc_modules:
                modules = self.writer.snapshots.merge_modules(sn, reading.soc_modules)
                values["soc_min_percent"] = min(modules.values())
            # Positional (Row's field order): keyword arguments cost a dataclass twice as much.
            rows.append(Row(ts, sn, source, reading.raw, values, reading.model, raw_json,
                            topic, payload, received_at, None, False,
                            self._packs(reading, topic or source)))

        self.writer.add_rows(rows, on_commit)
        if self.metrics:
            self.metrics.decoded(source, rows)
        if self.state_out is not None:
            for row in rows:
                self.state_out.offer(row.device_sn, row)
        return len(rows)

    def _packs(self, reading, where: str) -> tuple:
        """The pack health the reading's payload reports; a failure there costs only that."""
        try:
            return tuple(pack_health(reading))
        except Exception as exc:  # the reading itself is stored either way
            self._decoder_bug(exc, where)
            return ()

    def _decoder_bug(self, exc: Exception, where: str) -> None:
        """Log a decoder failure with its traceback the first time it happens at a place in
        the code, and in one line after that: a stream of such payloads must not flood the log."""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        key = (type(exc), tb.tb_frame.f_code.co_filename if tb else None,
               tb.tb_lineno if tb else None)
        if key in self._bugs_logged or len(self._bugs_logged) >= 100:
            log.error("decoder failed on a payload from %s: %r (traceback logged before)",
                      where, exc)
            return
        self._bugs_logged.add(key)
        log.error("decoder failed on a payload from %s", where, exc_info=exc)

    def dead_letter(self, source, topic, payload, reason, sn, on_commit) -> int:
        shown = reason if len(reason) <= 300 else reason[:300] + "..."
        log.warning("undecodable payload from %s (%d bytes): %r", topic or source, len(payload),
                    shown)
        self.writer.add_error(IngestError(source, topic, bytes(payload), reason, sn), on_commit)
        if self.metrics:
            self.metrics.failed(source)
        return 0

    def _publish(self, row: Row) -> None:
        """The normalized state of the ecoflow-power-management telemetry contract."""
        v = row.values
        modules = self.writer.snapshots.merge_modules(row.device_sn, {})
        device = self.names.get(row.device_sn, row.device_sn)
        state = {
            "ts": int(row.ts.timestamp() * 1000),
            "device": device,
            "device_sn": row.device_sn,
            "soc": v.get("soc_percent"),
            "soc_min": v.get("soc_min_percent"),
            "soc_modules": list(modules.values()) or (
                [v["soc_percent"]] if v.get("soc_percent") is not None else []),
            "grid_connected": v.get("grid_connected"),
            "watts_in": v.get("watts_in_sum"),
            "watts_out": v.get("watts_out_sum"),
            "remain_time_min": v.get("remain_time_min"),
            "source": row.source,
        }
        try:
            self.publish_state(f"bridge-ecoflow/{device}/json/state", state)
        except Exception:
            log.exception("publishing the normalized state of %s failed", device)


def state_json(state: dict) -> bytes:
    return json.dumps(state, separators=(",", ":")).encode()
