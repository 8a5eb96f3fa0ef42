"""Collector CPU per 1,000 readings, stage by stage, against issue #14's target (<= 12 ms).

The collector's own CPU (this process's `time.process_time()`: user + system, every thread),
measured around each stage of the hot path on the same messages:

- MQTT receive: the bridge source's client (`servicekit.mqtt.make_client(fast_receive=True)`,
  manual acks sent with `ack_many` every 1,000 messages) draining the messages from a real
  Mosquitto, where a publisher process queued them in its persistent session beforehand; the
  message handler only counts.
- JSON parse: `collector.decoders.registry._as_json`, the parse `decode()` runs.
- decode/map: from the parsed document to a Reading (`decode_json`); protobuf payloads
  (which have no JSON parse) count their whole `decode()` here.
- row build: `Pipeline._queue` (serial number, raw JSON checks, clock bound, per-pack merge,
  the Row), with a writer stand-in that only collects the rows.
- snapshot merge: `SnapshotMerger.merge` and `binary_safe`, as `Writer.add_rows` runs them.
- COPY format/write: `Writer._write` on batches of 1,000 rows into a real PostgreSQL with
  TimescaleDB (client side only: the server's CPU is not the collector's).
- total (stages): the sum. total (pipeline): the same messages through `Pipeline.handle` with
  a real `Writer` flushed every 1,000 messages, plus MQTT receive: what the collector spends,
  measured in one piece, as a check on the stage split.

Two mixes: `fixtures`, every captured payload of tests/fixtures/payloads in turn (app and open
MQTT pushes, latestQuotas replies, REST maps, protobuf heartbeats; large and small), and
`push`, the small Delta 2 push `bench.ingest` publishes. Each figure is the lowest of
`--repeat` runs (CPU time is disturbed upwards only, by other processes on the cores).

Instructions per push (when valgrind is installed; `--no-instructions` skips it): CPU time on
a shared machine moves by tens of percent between runs, so a change of a few percent cannot be
seen in it. callgrind counts the instructions the interpreter executes, which repeat exactly
for the same code and messages whatever else the machine does. The push mix goes through the
path of a live collector, without the network: the bridge source's message callback
(receive time, redelivery check, ack bookkeeping), `Pipeline.handle` with the metrics and
liveness hooks, `Writer.add_rows` and `Writer.flush` into a real PostgreSQL every 1,000
messages; then the same without the metrics hooks, and `Pipeline.handle` + `Writer.flush`
alone (what "total (pipeline)" times). Each figure is (instructions for 2N messages - for N)
/ N, both runs making the same 2N messages first, so start-up, imports, making the messages
and the first plans cancel out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bench.common import migrated_database, save, table

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "payloads"
STATIONS = 20
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
BATCH = 1000
TARGET_MS = 12.0
# A serial number per fixture family, so each payload keeps its model's decoding rules.
_SN_PREFIX = {"delta2max": "R351", "delta2": "R331", "river2pro": "R621", "river2": "R601",
              "river3": "R631", "deltamax": "DAEB", "deltapro3": "MR51", "delta3plus": "R631",
              "powerstream": "HW51", "smartplug": "HW52"}


def fixture_payloads() -> list[tuple[str, bytes]]:
    """(serial prefix, payload bytes) of every fixture that is a whole, decodable payload."""
    from collector.decode_cli import payload_from_fixture
    from collector.decoders import DecodeError, decode

    out = []
    for path in sorted(FIXTURES.glob("*.json")):
        found = payload_from_fixture(json.loads(path.read_text()))
        if found is None:
            continue
        try:  # a capture kept for its decode error (a truncated reply) is not traffic
            decode(found[0], topic=found[1])
        except DecodeError:
            continue
        family = path.name.split("_", 1)[0]
        out.append((_SN_PREFIX.get(family, "R331"), found[0]))
    return out


def mix(kind: str, n: int) -> list[tuple[str, bytes]]:
    """n (topic, payload) messages over STATIONS stations per fixture family."""
    items = []
    if kind == "push":
        for i in range(n):
            k = i // STATIONS
            body = {"id": i, "version": "1.0",
                    "timestamp": int((T0 + timedelta(seconds=k)).timestamp() * 1000),
                    "params": {"bms_emsStatus.f32LcdShowSoc": 50 + (k % 50) / 2,
                               "pd.wattsOutSum": 100 + k % 200, "pd.wattsInSum": 0,
                               "inv.inputWatts": 0, "inv.acInVol": 230000}}
            items.append((f"bridge-ecoflow/R351BENCH{i % STATIONS:06d}/data",
                          json.dumps(body).encode()))
        return items
    fixtures = fixture_payloads()
    for i in range(n):
        prefix, payload = fixtures[i % len(fixtures)]
        station = (i // len(fixtures)) % STATIONS
        items.append((f"bridge-ecoflow/{prefix}BENCH{station:06d}/data", payload))
    return items


# -- MQTT receive -------------------------------------------------------------------------------

def receive_cpu(items: list[tuple[str, bytes]]) -> float:
    """CPU seconds this process spends receiving (and acking) `items` from a real broker."""
    from bench.ingest import publish
    from collector.sources.bridge import receive_window
    from servicekit.mqtt import make_client, persistent_session
    from testbed.mosquitto import MosquittoServer

    with MosquittoServer() as broker:
        client_id = "bench-collector-receive"

        def client_session():
            client = make_client(client_id, manual_ack=True, fast_receive=True)
            subscribed = threading.Event()
            client.on_subscribe = lambda *a: subscribed.set()
            client.on_connect = lambda c, *a: c.subscribe("bridge-ecoflow/+/data", qos=1)
            return client, subscribed

        client, subscribed = client_session()  # the persistent session, then away
        client.connect(broker.host, broker.port, clean_start=False,
                       properties=persistent_session(receive_window(BATCH)))
        client.loop_start()
        if not subscribed.wait(10):
            raise SystemExit("the bench subscriber did not subscribe")
        client.disconnect()
        client.loop_stop()
        publish(broker, items, 1)  # queued by the broker for the session

        client, _ = client_session()
        done, mids, count = threading.Event(), [], [0]

        def on_message(c, _userdata, msg):
            mids.append(msg.mid)
            count[0] += 1
            if len(mids) >= BATCH or count[0] == len(items):
                c.ack_many(mids)
                mids.clear()
            if count[0] == len(items):
                done.set()

        client.on_message = on_message
        start = time.process_time()
        client.connect(broker.host, broker.port, clean_start=False,
                       properties=persistent_session(receive_window(BATCH)))
        client.loop_start()
        if not done.wait(300):
            raise SystemExit(f"received {count[0]} of {len(items)} messages")
        cpu = time.process_time() - start
        client.disconnect()
        client.loop_stop()
        return cpu


# -- the stages in process ------------------------------------------------------------------------

class _Collecting:
    """A writer stand-in for `Pipeline._queue`: keeps the rows, merges nothing."""

    def __init__(self):
        from collector.rows import SnapshotMerger

        self.snapshots = SnapshotMerger()
        self.rows: list = []

    def add_rows(self, rows, on_commit=None):
        self.rows += rows


def stages_cpu(items: list[tuple[str, bytes]], url: str) -> dict[str, float]:
    """CPU seconds of each in-process stage over `items`."""
    import psycopg

    from collector.decoders import decode, registry, sn_from_topic
    from collector.pipeline import Pipeline
    from collector.writer import Writer

    cpu = {}
    clock = time.process_time
    received = [T0 + timedelta(milliseconds=10 * i) for i in range(len(items))]

    start = clock()
    parsed = [registry._as_json(payload) for _, payload in items]
    cpu["JSON parse"] = clock() - start

    start = clock()
    readings = []
    for (topic, payload), (document, text) in zip(items, parsed):
        if document is not None:
            reading = registry.decode_json(document, topic, "bridge")
            reading.raw_json = text
            readings.append([reading])
        else:
            readings.append(decode(payload, topic=topic, source="bridge"))
    cpu["decode/map"] = clock() - start

    stand_in = _Collecting()
    pipeline = Pipeline(stand_in)
    start = clock()
    for (topic, payload), found, at in zip(items, readings, received):
        pipeline._queue(found, payload, topic, sn_from_topic(topic), "bridge", None, at)
    cpu["row build"] = clock() - start
    rows = stand_in.rows

    # As Writer.add_rows merges: the snapshot, and whether the row suits the binary COPY
    # (without the second, every batch below would take the text COPY).
    merge, binary_safe = stand_in.snapshots.merge, stand_in.snapshots.binary_safe
    start = clock()
    for row in rows:
        row.values = merge(row.device_sn, row.values)
        row.binary = binary_safe(row.device_sn)
    cpu["snapshot merge"] = clock() - start

    # Distinct times per station, as a live stream has them (the fixtures repeat theirs).
    for i, row in enumerate(rows):
        row.ts = T0 + timedelta(milliseconds=10 * i)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE ecoflow_measurements")
    writer = Writer(url, batch_rows=BATCH)
    writer._connect()
    start = clock()
    for i in range(0, len(rows), BATCH):
        writer._write(rows[i:i + BATCH], [])
    cpu["COPY format/write"] = clock() - start
    writer.stop()
    return cpu


def pipeline_cpu(items: list[tuple[str, bytes]], url: str) -> float:
    """CPU seconds of `Pipeline.handle` + `Writer.flush` over `items` (one piece)."""
    import psycopg

    from collector.pipeline import Pipeline
    from collector.writer import Writer

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE ecoflow_measurements")
    writer = Writer(url, batch_rows=BATCH)
    writer._connect()
    pipeline = Pipeline(writer)
    # The fixtures repeat their device times: the receive time of a live stream stands in,
    # later than any of them, with the devices' clocks taken as wrong (MAX_CLOCK_AHEAD).
    received = [T0 + timedelta(days=3650, milliseconds=10 * i) for i in range(len(items))]
    handle, flush = pipeline.handle, writer.flush
    start = time.process_time()
    for i, ((topic, payload), at) in enumerate(zip(items, received), 1):
        handle(payload, topic, "bridge", received_at=at)
        if i % BATCH == 0:
            flush()
    flush()
    cpu = time.process_time() - start
    writer.stop()
    return cpu


# -- instructions (callgrind) ----------------------------------------------------------------------

INSTRUCTION_PATHS = {
    "live": "bridge callback + pipeline with metrics + writer",
    "no_metrics": "bridge callback + pipeline + writer",
    "pipeline": "Pipeline.handle + Writer.flush",
}


# Pushes per instruction count: the figure is (count for 2N - count for N) / N.
INSTRUCTION_N = 2000


def _instructions_child(path: str, n: int, url: str) -> None:
    """Run n pushes through `path` (INSTRUCTION_PATHS); callgrind counts the process. The
    messages of both counts are made alike (2 x INSTRUCTION_N of them), so making them is not
    counted in the difference."""
    import paho.mqtt.client as mqtt
    import psycopg

    from collector.metrics import Metrics
    from collector.pipeline import Pipeline, tune_gc
    from collector.sources.bridge import BridgeSource
    from collector.sources.liveness import Liveness
    from collector.writer import Writer

    messages = []
    for i, (topic, payload) in enumerate(mix("push", 2 * INSTRUCTION_N)):
        msg = mqtt.MQTTMessage(mid=i % 65535 + 1, topic=topic.encode())
        msg.payload, msg.qos = payload, 1
        messages.append(msg)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE ecoflow_measurements")
    metrics = Metrics() if path == "live" else None
    writer = Writer(url, batch_rows=BATCH, metrics=metrics)
    writer._connect()
    pipeline = Pipeline(writer, metrics=metrics)
    if metrics is not None:
        liveness = Liveness(3, 10, default_period=5)
        metrics.attach_liveness(liveness)
    source = BridgeSource(pipeline, "127.0.0.1", 1, ["bridge-ecoflow/+/data"], "bench")
    if path == "pipeline":
        def deliver(msg, handle=pipeline.handle):
            handle(msg.payload, msg.topic, "bridge")
    else:
        def deliver(msg, on_message=source._on_message):
            on_message(None, None, msg)
    tune_gc()
    for i, msg in enumerate(messages[:n], 1):
        deliver(msg)
        if i % BATCH == 0:
            writer.flush()
    writer.flush()
    if writer.rows_written != n:
        raise SystemExit(f"{path}: {writer.rows_written} of {n} rows written")


def instructions(url: str, n: int = INSTRUCTION_N) -> dict[str, float] | None:
    """Instructions per push on each path (None without valgrind)."""
    if shutil.which("valgrind") is None:
        return None

    def count(path: str, messages: int) -> int:
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
             "-m", "bench.collector", "--instructions-child", path, str(messages), url],
            cwd=REPO, capture_output=True, text=True,
            env=dict(os.environ, PYTHONHASHSEED="0"))  # the same dict layouts every run
        for line in done.stderr.splitlines():
            if "Collected :" in line:
                return int(line.split()[-1])
        raise SystemExit(f"callgrind gave no count for {path}:\n{done.stderr[-2000:]}")

    return {path: (count(path, 2 * n) - count(path, n)) / n for path in INSTRUCTION_PATHS}


def measure(kind: str, n: int, repeat: int, url: str) -> dict:
    from collector.pipeline import tune_gc

    items = mix(kind, n)
    tune_gc()  # as the collector's service does once it is set up
    best: dict[str, float] = {}
    for _ in range(repeat):
        for name, seconds in [("MQTT receive", receive_cpu(items)),
                              *stages_cpu(items, url).items(),
                              ("pipeline", pipeline_cpu(items, url))]:
            best[name] = min(best.get(name, float("inf")), seconds)
    per_k = {name: round(s * 1e6 / n, 2) for name, s in best.items()}
    staged = [k for k in per_k if k != "pipeline"]
    per_k["total (stages)"] = round(sum(per_k[k] for k in staged), 2)
    per_k["total (pipeline)"] = round(per_k.pop("pipeline") + per_k["MQTT receive"], 2)
    return per_k


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20_000, help="messages per mix (default 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; lowest kept")
    parser.add_argument("--mix", default="fixtures,push", help="mixes (default fixtures,push)")
    parser.add_argument("--label", default="", help="a note saved with the figures")
    parser.add_argument("--no-instructions", action="store_true",
                        help="skip the instruction counts (callgrind, about two minutes)")
    parser.add_argument("--instructions-child", nargs=3, metavar=("PATH", "N", "URL"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.instructions_child:
        path, count, url = args.instructions_child
        _instructions_child(path, int(count), url)
        return 0
    mixes = [m for m in args.mix.split(",") if m]
    results = {}
    with migrated_database("collector") as (_pg, url):
        for kind in mixes:
            results[kind] = measure(kind, args.n, args.repeat, url)
        counts = None if args.no_instructions else instructions(url)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    names = list(next(iter(results.values())))
    lines = [(name, *(f"{results[k][name]:.2f}" for k in mixes),
              (f"target <= {TARGET_MS:g}: " + ("met" if all(
                  results[k][name] <= TARGET_MS for k in mixes) else "NOT met"))
              if name.startswith("total") else "") for name in names]
    print(f"\nCollector CPU milliseconds per 1,000 readings ({args.n} messages per mix, lowest"
          f" of {args.repeat}, {os.cpu_count()} cores, Python {sys.version.split()[0]})\n")
    print(table(lines, ("stage", *mixes, "")))
    print(f"\npeak RSS of this bench process: {rss_mb:.0f} MB (it holds every message, reading"
          " and row of the mixes at once; a collector process's RSS, target < 150 MB, is"
          " measured by bench.ingest)")
    if counts is None and not args.no_instructions:
        print("\ninstructions per push: skipped (valgrind is not installed)")
    elif counts is not None:
        print("\nInstructions per push (callgrind; the same for the same code and messages)\n")
        print(table([(INSTRUCTION_PATHS[p], f"{c:,.0f}") for p, c in counts.items()],
                    ("path", "instructions")))
    save("collector", {"messages": args.n, "repeat": args.repeat, "label": args.label,
                       "cpu_ms_per_1000": results, "target_ms_per_1000": TARGET_MS,
                       "peak_rss_mb": round(rss_mb, 1),
                       "instructions_per_push": counts and {p: round(c) for p, c in
                                                            counts.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
