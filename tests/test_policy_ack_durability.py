"""An agent's ack is the worker's to lose only after it is in the database (D5).

Real Mosquitto, real PostgreSQL, the worker's own MQTT link with its persistent session. The
worker acknowledges an ack or status message to the broker (PUBACK) only once what it means is
committed: a worker killed between receiving an ack and storing it gets the ack again from the
broker when it comes back, and a database that fails in between costs nothing either. An ack the
broker redelivers after it was stored (the worker died between the commit and the PUBACK) is
stored once, not twice."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import paho.mqtt.client as mqtt
import psycopg

from policy.commands import Command
from policy.mqttlink import MqttLink
from policy.settings import PolicySettings
from policy.worker import Worker, serve
from testbed.forwarder import Forwarder

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)

# The worker in a process of its own, with a hook in the ack handler: "before" holds the
# handler before anything is written, "after" right after the ack is committed. Either way
# the test kills it there with SIGKILL, as a crash or an OOM kill would.
WORKER_SCRIPT = r"""
import sys, time
import psycopg
from policy.mqttlink import MqttLink
from policy.settings import PolicySettings
from policy.worker import Worker

mode, host, port, client_id, db_url = sys.argv[1:]
original = Worker.record_ack

def hooked(self, msg, now):
    if mode == "before":
        print("holding", flush=True)
        time.sleep(3600)
    original(self, msg, now)
    print("committed", flush=True)
    time.sleep(3600)

Worker.record_ack = hooked
settings = PolicySettings(mqtt_host=host, mqtt_port=int(port), signing_key="k")
link = MqttLink(host, int(port), client_id)
link.start()
assert link.connected.wait(10)
time.sleep(0.3)  # the subscription is in place
with psycopg.connect(db_url, autocommit=True) as conn:
    worker = Worker(conn, settings, link)
    print("ready", flush=True)
    while True:
        worker.handle_incoming(worker.db_now())
        time.sleep(0.02)
"""


def settings_for(broker, **overrides) -> PolicySettings:
    values = dict(mqtt_host=broker.host, mqtt_port=broker.port, signing_key="k",
                  command_ttl_sec=3600)
    values.update(overrides)
    return PolicySettings(**values)


def make_commands(db, settings, agent: str, count: int) -> list[str]:
    worker = Worker(db, settings)
    ids = []
    for n in range(count):
        cmd = Command(agent, "test", 0, settings.command_ttl_sec, int(NOW.timestamp()),
                      f"test-{n}", "", "durability test")
        assert worker.create_command(cmd, db.execute("SELECT now()").fetchone()[0])
        ids.append(cmd.id)
    return ids


class Agent:
    """The agent's side: publishes acks with QoS 1 and waits for the broker's PUBACK."""

    def __init__(self, broker, name: str):
        self.name = name
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"agent-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def ack(self, cmd_id: str, status: str = "received", detail: str = "") -> None:
        body = {"id": cmd_id, "agent": self.name, "status": status, "host": f"{self.name}.lan",
                "ts": int(NOW.timestamp()), "detail": detail}
        self.client.publish(f"power-manager/{self.name}/ack", json.dumps(body),
                            qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        threading.Thread(target=self.client.loop_stop, daemon=True).start()


def stored_acks(db, agent: str) -> list[str]:
    return [str(r[0]) for r in db.execute(
        "SELECT command_id FROM command_acks WHERE agent_id = %s ORDER BY id", (agent,))]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {what}")
        time.sleep(0.05)


def start_worker_process(mode: str, broker, client_id: str, db_url: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER_SCRIPT, mode, broker.host, str(broker.port), client_id,
         db_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=ROOT)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def expect_line(proc: subprocess.Popen, line: str, timeout: float = 10.0) -> None:
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline().strip()),
                              daemon=True)
    reader.start()
    reader.join(timeout)
    assert got == [line], f"worker said {got} instead of {line!r}"


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@contextmanager
def worker_to_kill(mode: str, broker, client_id: str, db_url: str, agent: str):
    """The hooked worker process (WORKER_SCRIPT in `mode`) and an agent acking to it; the
    worker is killed, if the test has not, and the agent closed, whatever the test did."""
    proc = start_worker_process(mode, broker, client_id, db_url)
    sender = Agent(broker, agent)
    try:
        yield proc, sender
    finally:
        if proc.poll() is None:
            kill(proc)
        sender.close()


def restarted_worker_takes(db, broker, client_id: str, settings, agent: str, count: int,
                           timeout: float = 15.0) -> list[str]:
    """A new worker under the same client id (the persistent session) until `count` acks of
    `agent` are stored or `timeout`; then a second more for anything redelivered twice."""
    link = MqttLink(broker.host, broker.port, client_id)
    link.start()
    try:
        worker = Worker(db, settings, link)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(stored_acks(db, agent)) < count:
            worker.handle_incoming(worker.db_now())
            time.sleep(0.05)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            worker.handle_incoming(worker.db_now())
            time.sleep(0.05)
        return stored_acks(db, agent)
    finally:
        link.stop()


# -- the worker dies ------------------------------------------------------------------------
def test_ack_received_but_not_stored_when_the_worker_dies_is_redelivered(db, db_url,
                                                                         mqtt_broker):
    """SIGKILL after the ack reached the worker, before anything was written: the broker still
    holds it unacknowledged and hands it to the restarted worker; the command is acked, not
    left to expire and be re-issued."""
    agent, client_id = f"nas-{uuid.uuid4().hex[:6]}", f"policy-{uuid.uuid4().hex[:8]}"
    settings = settings_for(mqtt_broker)
    [cmd_id] = make_commands(db, settings, agent, 1)
    with worker_to_kill("before", mqtt_broker, client_id, db_url, agent) as (proc, sender):
        sender.ack(cmd_id, "scheduled", "shutdown in 120 s")
        expect_line(proc, "holding")
        time.sleep(0.3)  # whatever the worker would send the broker on receipt, it has sent
        kill(proc)
        assert stored_acks(db, agent) == []
        assert restarted_worker_takes(db, mqtt_broker, client_id, settings, agent, 1) == \
            [cmd_id], "the ack was lost with the worker"
        status, acked = db.execute("SELECT status, acked_at IS NOT NULL FROM commands"
                                   " WHERE id = %s", (cmd_id,)).fetchone()
        assert (status, acked) == ("scheduled", True)


def test_ack_stored_but_not_acknowledged_when_the_worker_dies_is_stored_once(db, db_url,
                                                                           mqtt_broker):
    """SIGKILL between the commit and the PUBACK: the broker redelivers the ack (DUP) and the
    restarted worker must not store it, nor its event, a second time."""
    agent, client_id = f"nas-{uuid.uuid4().hex[:6]}", f"policy-{uuid.uuid4().hex[:8]}"
    settings = settings_for(mqtt_broker)
    [cmd_id] = make_commands(db, settings, agent, 1)
    with worker_to_kill("after", mqtt_broker, client_id, db_url, agent) as (proc, sender):
        sender.ack(cmd_id, "executing", "halting now")
        expect_line(proc, "committed")
        kill(proc)
        assert stored_acks(db, agent) == [cmd_id]
        assert restarted_worker_takes(db, mqtt_broker, client_id, settings, agent, 2,
                                      timeout=3.0) == [cmd_id], "a redelivery stored twice"
        acked_events = db.execute(
            "SELECT count(*) FROM policy_events WHERE kind = 'command_acked'"
            " AND command_id = %s", (cmd_id,)).fetchone()[0]
        assert acked_events == 1
        assert db.execute("SELECT status FROM commands WHERE id = %s",
                          (cmd_id,)).fetchone()[0] == "executing"


def test_a_genuine_repeat_of_the_same_ack_is_still_stored(db, mqtt_broker):
    """Only a broker redelivery is recognised as a copy: an agent that sends the same ack
    twice (it answered two sends of the command) is stored twice, as before."""
    agent, client_id = f"nas-{uuid.uuid4().hex[:6]}", f"policy-{uuid.uuid4().hex[:8]}"
    settings = settings_for(mqtt_broker)
    [cmd_id] = make_commands(db, settings, agent, 1)
    link = MqttLink(mqtt_broker.host, mqtt_broker.port, client_id)
    link.start()
    sender = Agent(mqtt_broker, agent)
    try:
        time.sleep(0.3)
        worker = Worker(db, settings, link)
        sender.ack(cmd_id, "rejected", "duplicate")
        sender.ack(cmd_id, "rejected", "duplicate")
        wait_for(lambda: (worker.handle_incoming(worker.db_now()),
                          len(stored_acks(db, agent)) >= 2)[1], 10, "both acks stored")
    finally:
        link.stop()
        sender.close()


def test_an_ack_that_can_never_be_stored_is_dropped_and_holds_up_nothing(db, mqtt_broker):
    """An ack PostgreSQL refuses (a time stamp out of its range) is logged and acknowledged
    to the broker, not redelivered forever ahead of every later ack."""
    agent, client_id = f"nas-{uuid.uuid4().hex[:6]}", f"policy-{uuid.uuid4().hex[:8]}"
    settings = settings_for(mqtt_broker)
    bad_id, good_id = make_commands(db, settings, agent, 2)
    link = MqttLink(mqtt_broker.host, mqtt_broker.port, client_id)
    link.start()
    sender = Agent(mqtt_broker, agent)
    try:
        time.sleep(0.3)
        worker = Worker(db, settings, link)
        body = {"id": bad_id, "agent": agent, "status": "received", "ts": 1e300}
        sender.client.publish(f"power-manager/{agent}/ack", json.dumps(body),
                              qos=1).wait_for_publish(5)
        sender.ack(good_id)
        wait_for(lambda: (worker.handle_incoming(worker.db_now()),
                          stored_acks(db, agent) == [good_id])[1], 10, "the good ack stored")
    finally:
        link.stop()
    # Nothing is left with the broker for the next worker under this id.
    assert restarted_worker_takes(db, mqtt_broker, client_id, settings, agent, 2,
                                  timeout=2.0) == [good_id]
    sender.close()


# -- the database fails -----------------------------------------------------------------
class CuttableForwarder(Forwarder):
    """The database behind a port that can be cut: open connections dropped, new ones
    refused, until `open()` again."""

    def __init__(self, target):
        super().__init__(target)
        self.sockets: list[socket.socket] = []

    def _accept(self) -> None:
        server = self.server
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def cut(self) -> None:
        self.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sockets.clear()


def waiting_on_lock(db, table: str) -> bool:
    return db.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND query LIKE %s)", (f"%INSERT INTO {table}%",)).fetchone()[0]


def test_acks_survive_a_database_outage_in_order_none_lost_none_twice(db, db_url,
                                                                       mqtt_broker):
    """The real serve loop. The database goes away while the worker is writing the first ack
    (held on a table lock, then its connection cut), and 29 more acks arrive while it is away
    (more than Mosquitto's default in-flight window of 20). Once it is back, every ack is
    stored, in the order the agent sent them, each once."""
    agent, client_id = f"nas-{uuid.uuid4().hex[:6]}", f"policy-{uuid.uuid4().hex[:8]}"
    settings = settings_for(mqtt_broker, interval_sec=0.5)
    ids = make_commands(db, settings, agent, 30)
    parts = urlsplit(db_url)
    forwarder = CuttableForwarder((parts.hostname, parts.port))
    forwarder.open()
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{forwarder.port}"
    proxied = urlunsplit(parts._replace(netloc=netloc))
    link = MqttLink(mqtt_broker.host, mqtt_broker.port, client_id)
    link.start()
    stop = threading.Event()
    loop = threading.Thread(target=serve, args=(proxied, settings, link), daemon=True,
                            kwargs={"stop": stop})
    sender = Agent(mqtt_broker, agent)
    locker = psycopg.connect(db_url)
    try:
        time.sleep(0.3)
        loop.start()
        locker.execute("LOCK TABLE command_acks IN ACCESS EXCLUSIVE MODE")
        sender.ack(ids[0])
        wait_for(lambda: waiting_on_lock(db, "command_acks"), 10,
                 "the worker writing the first ack")
        forwarder.cut()  # the database is gone in the middle of the write
        locker.rollback()
        for cmd_id in ids[1:]:
            sender.ack(cmd_id)
        time.sleep(2.0)  # the worker retries and fails, meanwhile
        assert stored_acks(db, agent) == []
        forwarder.open()
        deadline = time.monotonic() + 20
        while len(stored_acks(db, agent)) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # and anything stored twice
        stored = stored_acks(db, agent)
        assert len(stored) == len(set(stored)), "an ack stored twice"
        assert [ids.index(c) for c in stored] == list(range(len(ids))), \
            "an ack lost, or stored out of order"
        assert stored == ids
        statuses = db.execute("SELECT DISTINCT status FROM commands WHERE agent_id = %s",
                              (agent,)).fetchall()
        assert statuses == [("received",)]
    finally:
        stop.set()
        locker.close()
        forwarder.cut()
        loop.join(10)
        link.stop()
        sender.close()
