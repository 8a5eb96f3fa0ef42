#!/usr/bin/env python3
"""Linux host agent: acts once on a genuine shutdown/abort/test command and acks what it did.

Standalone (Python 3.8+, paho-mqtt 2.x); the contract it implements is docs/command-contract.md.
Nothing from a payload is ever executed: actions map to the fixed local commands configured
below, and the only payload values that reach a command line are validated integers.
"""

import argparse
import hashlib
import hmac
import json
import logging
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

VERSION = "1.0.0"
CANONICAL_HEADER = "ecoflow-cmd-v1"
SIGNED_FIELDS = (
    "agent", "id", "action", "delay_sec", "ttl_sec", "issued_at", "episode_id", "cancels", "reason",
)
STRING_FIELDS = ("id", "agent", "action", "episode_id", "cancels", "reason", "sig")
INT_FIELDS = ("v", "delay_sec", "ttl_sec", "issued_at")
ACTIONS = ("shutdown", "abort", "test")
# Printable ASCII without '"' and '\': the contract's string alphabet, so the shell agent can
# read the same payloads without a JSON library and every agent rejects the same inputs.
SAFE_TEXT = re.compile(r'[\x20-\x21\x23-\x5b\x5d-\x7e]*')  # always fullmatch: $ would admit a final newline
MAX_PAYLOAD = 4096
MAX_DELAY_SEC = 86400
EXECUTED_RETENTION_SEC = 7 * 86400
# How SHUTDOWN_CMD is used (docs/agents.md, "SHUTDOWN_CMD"): a command with one of these
# placeholders is an OS halt timer, set when a shutdown is accepted and cancelled by ABORT_CMD;
# a known immediate halt is run at the commit point, after the pre-shutdown commands.
DELAY_PLACEHOLDERS = ("{delay_min}", "{delay_sec}")
TIMER = "timer"
HALT_AT_COMMIT = "halt_at_commit"
# Back-off between reconnect attempts: short, so the agent is back within a few seconds of the
# broker's return (with paho's default doubling up to 30 s a 15 s outage cost 16 s more).
RECONNECT_MIN_SEC = 1
RECONNECT_MAX_SEC = 2
# How long an ack sent just before halting may take to leave.
LAST_ACK_WAIT_SEC = 2

log = logging.getLogger("ecoflow-agent")


class ConfigError(Exception):
    pass


# -- settings -------------------------------------------------------------------------------
def read_env_file(path):
    """KEY=VALUE lines as systemd's EnvironmentFile or a shell would write them."""
    values = {}
    with open(path, encoding="utf-8") as fh:
        for number, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[len("export "):].lstrip()
            key, sep, value = line.partition("=")
            if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key.strip()):
                raise ConfigError(f"{path}:{number}: expected KEY=VALUE")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[key.strip()] = value
    return values


def _bool(env, name, default):
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean: use true or false")


def _int(env, name, default, low, high):
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None
    if not low <= number <= high:
        raise ConfigError(f"{name}={number} is out of range {low}..{high}")
    return number


def _argv(env, name, default):
    text = env.get(name, "").strip() or default
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"{name} cannot be split into arguments: {exc}") from None
    if not argv:
        raise ConfigError(f"{name} is empty")
    return argv


def classify_shutdown_cmd(argv, abort_cmd_set):
    """TIMER or HALT_AT_COMMIT for SHUTDOWN_CMD, or raise ConfigError saying what to write.

    The earlier tool's SHUTDOWN_CMD="shutdown -h now" meant "halt after the pre-shutdown
    commands"; run at acceptance it would halt at once, with no abort window. So only a timer
    (it has a delay placeholder) is run at acceptance, only a known immediate halt is run at
    the commit point, and anything else is refused before it can surprise anyone."""
    text = " ".join(argv)
    program, args = os.path.basename(argv[0]), argv[1:]
    recommended = ("write SHUTDOWN_CMD=shutdown -h +{delay_min} (recommended: the OS halts even "
                   "if the agent dies) or SHUTDOWN_CMD=shutdown -h now (halts at the commit "
                   "point, after the PRE_SHUTDOWN_CMD_n commands)")
    short_flags = "".join(a[1:] for a in args if a.startswith("-") and not a.startswith("--"))
    if (program == "reboot" or (program == "shutdown" and ("r" in short_flags or "--reboot" in args))
            or (program == "systemctl" and args[:1] in (["reboot"], ["kexec"], ["soft-reboot"]))):
        raise ConfigError(f"SHUTDOWN_CMD={text!r} restarts the host instead of halting it (it "
                          f"would come back up on battery): {recommended}")
    if any(p in a for a in argv for p in DELAY_PLACEHOLDERS):
        if program != "shutdown" and not abort_cmd_set:
            raise ConfigError(
                f"SHUTDOWN_CMD={text!r} sets a halt timer but ABORT_CMD is not set, so an abort "
                "could not cancel it: set ABORT_CMD to the command that cancels this timer, or "
                "write SHUTDOWN_CMD=shutdown -h +{delay_min} (cancelled by the default "
                "ABORT_CMD=shutdown -c)")
        return TIMER
    if _is_immediate_halt(program, args):
        return HALT_AT_COMMIT
    raise ConfigError(
        f"SHUTDOWN_CMD={text!r} is neither a halt timer (a command with {{delay_min}} or "
        "{delay_sec}) nor a known immediate halt (shutdown -h now, shutdown -h 0, poweroff, "
        f"halt, systemctl poweroff): {recommended}")


def _is_immediate_halt(program, args):
    if program == "shutdown":
        flags = [a for a in args if a.startswith("-")]
        rest = [a for a in args if not a.startswith("-")]
        # shutdown [-h|-P|-H] now|0|+0 [wall message]
        return (set(flags) <= {"-h", "-P", "-H", "--halt", "--poweroff", "--no-wall"}
                and rest[:1] in (["now"], ["0"], ["+0"])
                and args.index(rest[0]) == len(flags))
    if program in ("poweroff", "halt"):
        return set(args) <= {"-p", "--poweroff", "--no-wall"}
    if program == "systemctl":
        return args[:1] in (["poweroff"], ["halt"]) and set(args[1:]) <= {"--no-wall"}
    return False


class Settings:
    """Everything the agent reads from its environment, validated once at start."""

    def __init__(self, env):
        self.agent_id = env.get("AGENT_ID", "").strip()
        if not self.agent_id:
            raise ConfigError("AGENT_ID is empty: set it to this host's name in the policy "
                              "topology (it is also its MQTT user name)")
        if not re.match(r"^[A-Za-z0-9._-]{1,64}$", self.agent_id):
            raise ConfigError(f"AGENT_ID={self.agent_id!r}: use letters, digits, '.', '_', '-'")
        self.mqtt_host = env.get("MQTT_HOST", "").strip() or "localhost"
        self.mqtt_tls_ca = env.get("MQTT_TLS_CA", "").strip()
        self.mqtt_tls = bool(self.mqtt_tls_ca) or _bool(env, "MQTT_TLS", False)
        self.mqtt_port = _int(env, "MQTT_PORT", 8883 if self.mqtt_tls else 1883, 1, 65535)
        self.mqtt_user = env.get("MQTT_USER", "").strip() or self.agent_id
        self.mqtt_pass = env.get("MQTT_PASS", "")
        self.session_expiry_sec = _int(env, "MQTT_SESSION_EXPIRY_SEC", 3600, 60, 7 * 86400)
        self.signing_key = env.get("COMMAND_SIGNING_KEY", "")
        self.clock_skew_sec = _int(env, "CLOCK_SKEW_SEC", 60, 0, 3600)
        self.dry_run = _bool(env, "DRY_RUN", False)
        self.state_dir = env.get("STATE_DIR", "").strip() or "/var/lib/ecoflow-agent"
        self.dry_run_log = (env.get("DRY_RUN_LOG", "").strip()
                            or os.path.join(self.state_dir, "dry-run.jsonl"))
        self.pre_timeout_sec = _int(env, "PRE_SHUTDOWN_TIMEOUT_SEC", 60, 1, 3600)
        self.pre_shutdown = [
            _argv(env, f"PRE_SHUTDOWN_CMD_{n}", "") for n in range(1, 10)
            if env.get(f"PRE_SHUTDOWN_CMD_{n}", "").strip()
        ]
        self.shutdown_cmd = _argv(env, "SHUTDOWN_CMD", "shutdown -h +{delay_min}")
        self.abort_cmd = _argv(env, "ABORT_CMD", "shutdown -c")
        self.shutdown_mode = classify_shutdown_cmd(self.shutdown_cmd,
                                                   bool(env.get("ABORT_CMD", "").strip()))
        self.failsafe_after_sec = _int(env, "FAILSAFE_AFTER_SEC", 0, 0, 86400)
        self.host = socket.gethostname()

    @property
    def topic_prefix(self):
        return f"power-manager/{self.agent_id}"

    @property
    def client_id(self):
        # Fixed, so the broker keeps this agent's session (and its queued commands) across
        # reconnects and restarts.
        return f"ecoflow-agent-{self.agent_id}"


# -- contract -------------------------------------------------------------------------------
def canonical(cmd):
    """The exact text that is signed (docs/command-contract.md, "Canonical form")."""
    return "\n".join([CANONICAL_HEADER] + [str(cmd[field]) for field in SIGNED_FIELDS])


def sign(key, cmd):
    return hmac.new(key.encode("utf-8"), canonical(cmd).encode("utf-8"), hashlib.sha256).hexdigest()


def parse_command(payload):
    """The command as a dict, or raise ValueError saying what is wrong with it."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload too large")
    try:
        cmd = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("not JSON") from None
    if not isinstance(cmd, dict):
        raise ValueError("not a JSON object")
    cmd.setdefault("episode_id", "")
    cmd.setdefault("cancels", "")
    cmd.setdefault("reason", "")
    for field in STRING_FIELDS:
        if field == "sig" and field not in cmd:
            continue
        value = cmd.get(field)
        if not isinstance(value, str):
            raise ValueError(f"{field} missing or not a string")
        if not SAFE_TEXT.fullmatch(value) or len(value) > 200:
            raise ValueError(f"{field} has characters outside the contract's alphabet")
    for field in INT_FIELDS:
        value = cmd.get(field)
        # bool is an int in Python; JSON true is not a number here.
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{field} missing or not an integer")
    if cmd["v"] != 1:
        raise ValueError(f"unsupported version {cmd['v']}")
    if not cmd["id"]:
        raise ValueError("id is empty")
    if cmd["action"] not in ACTIONS:
        raise ValueError(f"unknown action {cmd['action']}")
    if not 0 <= cmd["delay_sec"] <= MAX_DELAY_SEC:
        raise ValueError("delay_sec out of range")
    if not 1 <= cmd["ttl_sec"] <= MAX_DELAY_SEC:
        raise ValueError("ttl_sec out of range")
    return cmd


# -- local effects --------------------------------------------------------------------------
class Executor:
    """Runs fixed local commands, or records them when DRY_RUN is on."""

    def __init__(self, settings):
        self.settings = settings
        self._lock = threading.Lock()

    def run(self, step, argv, command_id, timeout):
        """Run argv (no shell); return (ok, detail)."""
        if self.settings.dry_run:
            entry = {"ts": time.time(), "agent": self.settings.agent_id, "command_id": command_id,
                     "step": step, "argv": argv}
            with self._lock, open(self.settings.dry_run_log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            log.info("dry run: %s for %s would run %s", step, command_id, shlex.join(argv))
            return True, "dry run"
        log.info("%s for %s: running %s", step, command_id, shlex.join(argv))
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            log.error("%s for %s: cannot start %s: %s", step, command_id, argv[0], exc)
            return False, f"{argv[0]}: {exc.strerror}"
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Kill the whole group: a wrapper script's children must not outlive the timeout.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            log.error("%s for %s: %s timed out after %d s", step, command_id, argv[0], timeout)
            return False, f"{argv[0]} timed out after {timeout} s"
        text = output.decode("utf-8", "replace").strip()[-500:]
        if proc.returncode != 0:
            log.error("%s for %s: %s exited %d: %s", step, command_id, argv[0],
                      proc.returncode, text)
            return False, f"{argv[0]} exited {proc.returncode}"
        log.info("%s for %s: %s done%s", step, command_id, argv[0], f": {text}" if text else "")
        return True, "ok"


class ExecutedIds:
    """Ids of commands already acted on, on disk and fsynced before acting (D2)."""

    def __init__(self, path):
        self.path = path
        self.ids = {}
        now = time.time()
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        entry = json.loads(line)
                        self.ids[entry["id"]] = entry["ts"]
                    except (ValueError, KeyError, TypeError):
                        # A torn last line from a crash mid-write: the id was not acted on.
                        continue
        # Expired commands are refused by their own expiry, so old ids need not be kept.
        self.ids = {i: ts for i, ts in self.ids.items() if now - ts < EXECUTED_RETENTION_SEC}
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            for command_id, ts in self.ids.items():
                fh.write(json.dumps({"id": command_id, "ts": ts}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def __contains__(self, command_id):
        return command_id in self.ids

    def add(self, command_id):
        ts = time.time()
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"id": command_id, "ts": ts}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.ids[command_id] = ts


# -- the agent ------------------------------------------------------------------------------
class Agent:
    def __init__(self, settings):
        self.s = settings
        os.makedirs(settings.state_dir, mode=0o700, exist_ok=True)
        self.executed = ExecutedIds(os.path.join(settings.state_dir, "executed-ids.jsonl"))
        self.executor = Executor(settings)
        self.lock = threading.Lock()
        self.pending = None  # {"id", "commit_at", "timer"} while a shutdown is in its window
        self.committed = set()  # shutdown ids past their commit point
        self.pending_file = os.path.join(settings.state_dir, "pending-shutdown.json")
        self.on_battery = False
        self.disconnected_since = None
        self.failsafe_fired = False
        self.stopping = threading.Event()
        self.client = self._make_client()

    # MQTT plumbing
    def _make_client(self):
        s = self.s
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=s.client_id,
                             protocol=mqtt.MQTTv5)
        client.username_pw_set(s.mqtt_user, s.mqtt_pass or None)
        if s.mqtt_tls:
            client.tls_set(ca_certs=s.mqtt_tls_ca or None)
        client.will_set(f"{s.topic_prefix}/status", self._status("offline"), qos=1, retain=True)
        client.reconnect_delay_set(RECONNECT_MIN_SEC, RECONNECT_MAX_SEC)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _status(self, state):
        return json.dumps({"state": state, "agent": self.s.agent_id, "version": VERSION,
                           "platform": "linux", "host": self.s.host, "ts": int(time.time()),
                           "dry_run": self.s.dry_run})

    def connect(self):
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.s.session_expiry_sec
        self.client.connect_async(self.s.mqtt_host, self.s.mqtt_port, keepalive=30,
                                  clean_start=False, properties=props)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        log.info("connected to %s:%d as %s (session present: %s)", self.s.mqtt_host,
                 self.s.mqtt_port, self.s.mqtt_user, flags.session_present)
        with self.lock:
            self.disconnected_since = None
        # Retain As Published keeps the retain flag on live deliveries too, so a retained
        # command is recognised (and refused) whether it was stored or just published.
        options = SubscribeOptions(qos=1, retainAsPublished=True)
        client.subscribe([(f"{self.s.topic_prefix}/cmd", options),
                          (f"{self.s.topic_prefix}/supply", SubscribeOptions(qos=1))])
        client.publish(f"{self.s.topic_prefix}/status", self._status("online"), qos=1,
                       retain=True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self.lock:
            if self.disconnected_since is None:
                self.disconnected_since = time.monotonic()
        if not self.stopping.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def ack(self, command_id, status, detail, wait=0):
        """Publish an ack; with `wait`, give it that many seconds to leave (before a halt)."""
        payload = {"id": command_id, "agent": self.s.agent_id, "status": status,
                   "host": self.s.host, "ts": int(time.time()), "detail": detail}
        info = self.client.publish(f"{self.s.topic_prefix}/ack", json.dumps(payload), qos=1)
        if wait:
            try:
                info.wait_for_publish(wait)
            except (RuntimeError, ValueError):
                log.warning("ack %s for %s could not be sent before halting", status, command_id)

    def _on_message(self, client, userdata, message):
        if message.topic.endswith("/supply"):
            self._on_supply(message)
            return
        try:
            self.handle(message.payload, bool(message.retain))
        except Exception:
            # One bad message must not stop the agent; the traceback is the evidence.
            log.exception("unexpected error while handling a command")

    # Decisions
    def handle(self, payload, retained):
        try:
            cmd = parse_command(payload)
        except ValueError as exc:
            command_id = _best_effort_id(payload)
            log.warning("command %r rejected: malformed (%s)", command_id, exc)
            self.ack(command_id, "rejected", f"malformed: {exc}")
            return
        command_id, action = cmd["id"], cmd["action"]
        where = f"command {command_id} ({action}, episode {cmd['episode_id'] or '-'})"
        if retained:
            log.warning("%s rejected: retained (commands are never retained)", where)
            self.ack(command_id, "rejected", "retained")
            return
        if cmd["agent"] != self.s.agent_id:
            log.warning("%s rejected: addressed to %s", where, cmd["agent"])
            self.ack(command_id, "rejected", "wrong agent")
            return
        if self.s.signing_key:
            if not cmd.get("sig"):
                log.warning("%s rejected: missing signature", where)
                self.ack(command_id, "rejected", "missing signature")
                return
            if not hmac.compare_digest(sign(self.s.signing_key, cmd), cmd["sig"].lower()):
                log.warning("%s rejected: bad signature", where)
                self.ack(command_id, "rejected", "bad signature")
                return
        now = int(time.time())
        if now > cmd["issued_at"] + cmd["ttl_sec"] + self.s.clock_skew_sec:
            log.warning("%s expired: issued %d s ago, ttl %d s", where,
                        now - cmd["issued_at"], cmd["ttl_sec"])
            self.ack(command_id, "expired", "expired")
            return
        if cmd["issued_at"] > now + self.s.clock_skew_sec:
            log.warning("%s rejected: issued %d s in the future", where, cmd["issued_at"] - now)
            self.ack(command_id, "rejected", "issued in the future (check the clocks)")
            return
        with self.lock:
            if command_id in self.executed:
                log.info("%s ignored: already handled (redelivery)", where)
                self.ack(command_id, "rejected", "duplicate")
                return
            if action == "abort":
                self._abort(cmd, where)
                return
            if action == "shutdown" and self.pending is not None:
                # One window at a time: the first shutdown stands, a second one adds nothing.
                log.warning("%s rejected: shutdown %s already scheduled", where,
                            self.pending["id"])
                self.ack(command_id, "rejected", f"shutdown {self.pending['id']} already pending")
                return
            self.executed.add(command_id)
            log.info("%s accepted: %s", where, cmd["reason"] or "no reason given")
            if action == "test":
                when = "" if self.s.shutdown_mode == TIMER else (
                    " at the commit point, after the pre-shutdown commands")
                self.ack(command_id, "received",
                         "test ok: would run " + shlex.join(self._shutdown_argv(0)) + when)
                return
            self._schedule(cmd, where)

    def _halt_delay(self, delay_sec):
        """Seconds until the OS halts: the window plus time for the pre-shutdown commands."""
        return delay_sec + self.s.pre_timeout_sec * len(self.s.pre_shutdown)

    def _shutdown_argv(self, delay_sec):
        halt = self._halt_delay(delay_sec)
        # shutdown(8) counts in whole minutes: round up so the halt never comes early.
        minutes = str(math.ceil(halt / 60))
        return [a.replace("{delay_sec}", str(halt)).replace("{delay_min}", minutes)
                for a in self.s.shutdown_cmd]

    def _schedule(self, cmd, where):
        command_id, delay = cmd["id"], cmd["delay_sec"]
        os_timer = self.s.shutdown_mode == TIMER
        if os_timer:
            # The OS timer is set first, so the host halts even if this agent dies in the window.
            ok, detail = self.executor.run("shutdown", self._shutdown_argv(delay), command_id, 60)
            if not ok:
                log.error("%s: SHUTDOWN_CMD failed: %s", where, detail)
                self.ack(command_id, "rejected", f"SHUTDOWN_CMD failed: {detail}")
                return
        # An immediate halt (SHUTDOWN_CMD=shutdown -h now) waits for the commit point.
        commit_at = time.time() + delay
        self._arm(command_id, commit_at, os_timer)
        status = "dry_run" if self.s.dry_run else "scheduled"
        log.info("%s %s: commit point in %d s", where, status, delay)
        self.ack(command_id, status, f"shutdown in {delay} s; abort possible until "
                                     f"{int(commit_at)}")

    def _arm(self, command_id, commit_at, os_timer):
        """Start the window's timer and remember it on disk, so an agent restarted inside
        the window can still honour an abort and still reach the commit point. `os_timer`:
        SHUTDOWN_CMD already set the OS halt timer (else the halt is run at the commit point)."""
        _write_json(self.pending_file, {"id": command_id, "commit_at": commit_at,
                                        "os_timer": os_timer})
        timer = threading.Timer(max(0.0, commit_at - time.time()), self._commit,
                                args=(command_id,))
        timer.daemon = True
        self.pending = {"id": command_id, "commit_at": commit_at, "timer": timer,
                        "os_timer": os_timer}
        timer.start()

    def restore_pending(self):
        try:
            with open(self.pending_file, encoding="utf-8") as fh:
                saved = json.load(fh)
            command_id, commit_at = str(saved["id"]), float(saved["commit_at"])
            # Files written before the halt-at-commit mode existed always meant an OS timer.
            os_timer = saved.get("os_timer", True) is not False
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError):
            log.error("ignoring unreadable %s", self.pending_file)
            return
        log.info("resuming the window of shutdown %s (commit point in %.0f s)", command_id,
                 max(0.0, commit_at - time.time()))
        with self.lock:
            self._arm(command_id, commit_at, os_timer)

    def _commit(self, command_id):
        with self.lock:
            if self.pending is None or self.pending["id"] != command_id:
                return
            os_timer = self.pending["os_timer"]
            self.pending = None
            self.committed.add(command_id)
            _remove(self.pending_file)
        log.info("shutdown %s reached its commit point: no abort from now on", command_id)
        failures = self._run_pre_shutdown(command_id)
        detail = "commit point reached; pre-shutdown: " + (
            "; ".join(failures) if failures else f"{len(self.s.pre_shutdown)} ok")
        status = "dry_run" if self.s.dry_run else "executing"
        if os_timer:
            self.ack(command_id, status, detail)
            return
        # Halt last: the ack goes out first, as the host may not get another chance.
        self.ack(command_id, status, detail + "; halting now", wait=LAST_ACK_WAIT_SEC)
        ok, halt_detail = self.executor.run("shutdown", self._shutdown_argv(0), command_id, 60)
        if not ok:
            log.critical("shutdown %s: SHUTDOWN_CMD failed, the host is NOT halting: %s",
                         command_id, halt_detail)
            self.ack(command_id, "rejected", f"SHUTDOWN_CMD failed: {halt_detail}")

    def _run_pre_shutdown(self, command_id):
        """PRE_SHUTDOWN_CMD_1..9 in order; the failures, each reported, none blocking."""
        failures = []
        for n, argv in enumerate(self.s.pre_shutdown, 1):
            ok, detail = self.executor.run(f"pre_shutdown_{n}", argv, command_id,
                                           self.s.pre_timeout_sec)
            if not ok:
                failures.append(f"PRE_SHUTDOWN_CMD_{n}: {detail}")
        return failures

    def _abort(self, cmd, where):
        command_id, target = cmd["id"], cmd["cancels"]
        if target in self.committed:
            log.warning("%s refused: shutdown %s is past its commit point", where, target)
            self.ack(command_id, "rejected", "abort after commit point")
            return
        if self.pending is None or self.pending["id"] != target:
            log.warning("%s rejected: no pending shutdown %r", where, target)
            self.ack(command_id, "rejected", f"no pending shutdown {target!r}")
            return
        self.executed.add(command_id)
        self.pending["timer"].cancel()
        os_timer = self.pending["os_timer"]
        self.pending = None
        _remove(self.pending_file)
        if not os_timer:
            # Nothing was handed to the OS: cancelling the agent's window is the whole abort.
            log.info("%s: shutdown %s aborted", where, target)
            self.ack(command_id, "aborted", f"cancelled {target}" + (" (dry run)"
                                                                     if self.s.dry_run else ""))
            return
        ok, detail = self.executor.run("abort", list(self.s.abort_cmd), command_id, 60)
        if not ok:
            # The agent's window is cancelled either way; the OS timer may still run.
            log.error("%s: ABORT_CMD failed: %s", where, detail)
            self.ack(command_id, "rejected", f"ABORT_CMD failed: {detail}")
            return
        log.info("%s: shutdown %s aborted", where, target)
        self.ack(command_id, "aborted", f"cancelled {target}" + (" (dry run)"
                                                                 if self.s.dry_run else ""))

    # D9: the policy worker tells the agent whether its supply is on battery (retained state,
    # not a command); if the broker is then lost for FAILSAFE_AFTER_SEC, the agent halts itself.
    def _on_supply(self, message):
        try:
            state = json.loads(message.payload.decode("utf-8"))
            on_battery = state.get("on_battery") is True
        except (UnicodeDecodeError, ValueError, AttributeError):
            log.warning("ignoring malformed supply state")
            return
        with self.lock:
            if on_battery != self.on_battery:
                log.info("supply is %s", "on battery" if on_battery else "on grid")
            self.on_battery = on_battery

    def check_failsafe(self):
        if not self.s.failsafe_after_sec or self.failsafe_fired:
            return
        with self.lock:
            lost = self.disconnected_since
            if not self.on_battery or lost is None:
                return
            if time.monotonic() - lost < self.s.failsafe_after_sec:
                return
            self.failsafe_fired = True
        log.critical("fail-safe: on battery and no broker for %d s: shutting down",
                     self.s.failsafe_after_sec)
        if self.s.shutdown_mode == TIMER:
            # Timer first, leaving time for the pre-shutdown commands; an immediate halt last.
            self.executor.run("failsafe_shutdown", self._shutdown_argv(0), "failsafe", 60)
            self._run_pre_shutdown("failsafe")
        else:
            self._run_pre_shutdown("failsafe")
            self.executor.run("failsafe_shutdown", self._shutdown_argv(0), "failsafe", 60)

    def run(self):
        self.restore_pending()
        self.connect()
        while not self.stopping.wait(0.2):
            self.check_failsafe()
        log.info("stopping")
        self.client.publish(f"{self.s.topic_prefix}/status", self._status("offline"), qos=1,
                            retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()


def _write_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(value, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _best_effort_id(payload):
    """The id of a malformed command, when there is a usable one, for its ack."""
    try:
        value = json.loads(payload.decode("utf-8")).get("id")
    except (UnicodeDecodeError, ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) and SAFE_TEXT.fullmatch(value) else ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", help="KEY=VALUE settings (the environment wins)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        env = read_env_file(args.env_file) if args.env_file else {}
        env.update(os.environ)
        settings = Settings(env)
    except (ConfigError, OSError) as exc:
        log.error("configuration: %s", exc)
        return 2
    if not settings.signing_key:
        log.warning("COMMAND_SIGNING_KEY is not set: commands are not authenticated; set the "
                    "same key as the policy worker")
    log.info("agent %s starting (dry run: %s, tls: %s, broker %s:%d)", settings.agent_id,
             settings.dry_run, settings.mqtt_tls, settings.mqtt_host, settings.mqtt_port)
    log.info("SHUTDOWN_CMD %s %s", shlex.join(settings.shutdown_cmd),
             "is set as an OS timer when a shutdown is accepted"
             if settings.shutdown_mode == TIMER else
             "is run at the commit point, after the pre-shutdown commands")
    agent = Agent(settings)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: agent.stopping.set())
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
