"""The Windows agent (agents/windows/ecoflow-agent.ps1) as far as it can be checked without
PowerShell, which this machine does not have: the script is never run here.

What is checked: its data tables (canonical form, alphabet, rejection order, default commands,
settings) against the contract, the shared vectors and the Linux agent; a few whole-script rules
(case-sensitive comparisons only, fixed commands only); and its mosquitto_sub invocation, run
with exactly the script's arguments and option lines against a real Mosquitto, through a TCP
proxy that can cut the connection. docs/agent-windows.md says what is not checked."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from tests.agent_scenarios import REPO, SIGNED_FIELDS, VECTORS

SCRIPT_PATH = REPO / "agents" / "windows" / "ecoflow-agent.ps1"
SCRIPT = SCRIPT_PATH.read_text()
TASK = REPO / "agents" / "windows" / "ecoflow-agent-task.xml"
ENV_EXAMPLE = REPO / "agents" / "windows" / "agent.env.example"
DOC = REPO / "docs" / "agent-windows.md"
CONTRACT = (REPO / "docs" / "command-contract.md").read_text()
LINUX = (REPO / "agents" / "linux" / "ecoflow-agent.py").read_text()


# -- reading the script's tables ------------------------------------------------------------
def ps_strings(text: str) -> list[str]:
    """The single-quoted PowerShell strings in text, in order ('' is a quote)."""
    return [s.replace("''", "'") for s in re.findall(r"'((?:[^']|'')*)'", text)]


def ps_array(name: str) -> list[str]:
    """`$name = @( ... )`: its single-quoted elements."""
    match = re.search(rf"^\${name} = @\((.*?)\)\s*$", SCRIPT, re.M | re.S)
    assert match, f"${name} = @(...) not found in the script"
    return ps_strings(match.group(1))


def ps_scalar(name: str) -> str:
    match = re.search(rf"^\${name} = '((?:[^']|'')*)'", SCRIPT, re.M)
    assert match, f"${name} = '...' not found in the script"
    return match.group(1).replace("''", "'")


def ps_function(name: str) -> str:
    match = re.search(rf"^function {name}\b.*?^\}}", SCRIPT, re.M | re.S)
    assert match, f"function {name} not found in the script"
    return match.group(0)


def ps_interpolated(name: str, **variables: str) -> str:
    """`$name = "...$Var..."` with the given variables substituted."""
    match = re.search(rf'^\${name} = "([^"]*)"', SCRIPT, re.M)
    assert match, f'${name} = "..." not found in the script'
    return re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], match.group(1))


def dotnet_regex(pattern: str) -> re.Pattern:
    """A .NET pattern of the kind the script uses, for Python: \\z (end of text) is \\Z here."""
    assert "\\Z" not in pattern, "the script must anchor with \\z, not \\Z (which allows a newline)"
    return re.compile(pattern.replace("\\z", "\\Z"))


def expand(template: str, values: dict) -> str:
    """Expand-Template: each {name} replaced by its value."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", str(value))
    return template


def verdict_rows() -> list[tuple[str, str, str]]:
    block = re.search(r"^\$Verdicts = @\((.*?)^\)", SCRIPT, re.M | re.S).group(1)
    return re.findall(r"@\{ Name = '(\w+)';\s+Status = '(\w+)';\s+Detail = '([^']*)';", block)


# -- a TCP proxy whose connections can be cut -----------------------------------------------
class CuttableProxy:
    """Forwards 127.0.0.1:port to the broker; cut() drops every connection at once, as a
    network failure would, while new connections are still accepted."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        with self.lock:
            victims, self.sockets = self.sockets, []
        for s in victims:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.closed = True
        self.listener.close()
        self.cut()


class Watcher:
    """A plain MQTT client recording what arrives on some topics."""

    def __init__(self, host: str, port: int, *topics: str):
        self.messages: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id="watch-" + uuid.uuid4().hex[:8], protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        # Retain As Published: a live message shows whether it was published retained.
        options = SubscribeOptions(qos=1, retainAsPublished=True)
        self.client.on_connect = lambda c, *a: c.subscribe([(t, options) for t in topics])
        self.client.on_message = lambda c, u, m: self.messages.put(
            (m.topic, m.payload.decode(), bool(m.retain)))
        self.client.connect(host, port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def publish(self, topic: str, payload: str, retain: bool = False):
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = 300
        self.client.publish(topic, payload, qos=1, retain=retain,
                            properties=props).wait_for_publish(10)

    def drain(self, seconds: float) -> list[tuple[str, str, bool]]:
        got, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        return got

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def read_lines(proc: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump():
        for raw in proc.stdout:
            lines.put(raw.decode().rstrip("\r\n"))

    threading.Thread(target=pump, daemon=True).start()
    return lines


def next_message(lines: queue.Queue, topic: str, timeout: float = 10) -> tuple[bool, str]:
    """The next subscriber line for topic, parsed with the script's own pattern."""
    pattern = dotnet_regex(ps_scalar("SubscriberLine"))
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        match = pattern.match(line)
        assert match, f"mosquitto_sub printed a line the script cannot read: {line!r}"
        if match.group(1) == topic:
            return match.group(2) == "1", bytes.fromhex(match.group(3)).decode()
    raise AssertionError(f"no line for {topic} within {timeout} s")


# -- the long-lived subscriber, for real ----------------------------------------------------
needs_clients = pytest.mark.skipif(
    not (shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub")),
    reason="needs mosquitto-clients")


@needs_clients
def test_subscriber_stays_up_and_its_will_fires_only_when_the_connection_drops(
        mqtt_broker, tmp_path):
    """The script's mosquitto_sub arguments and option lines, run on Linux against a real
    broker: it does not end on a quiet line (the old `-W 5` loop published the Last Will every
    5 s), every message arrives as a line the script's pattern reads with the retain flag kept,
    and the Will is published when the connection is cut, and only then."""
    agent = "win-" + uuid.uuid4().hex[:8]
    prefix = ps_interpolated("Prefix", AgentId=agent)
    client_id = ps_interpolated("ClientId", AgentId=agent)
    assert (prefix, client_id) == (f"power-manager/{agent}", f"ecoflow-agent-{agent}")
    proxy = CuttableProxy(mqtt_broker.host, mqtt_broker.port)
    will = json.dumps({"state": "offline", "agent": agent, "platform": "windows", "ts": 1,
                       "host": "will-" + agent})
    values = {"host": "127.0.0.1", "port": proxy.port, "user": agent, "prefix": prefix,
              "offline_status": will, "client_id": client_id, "session_expiry": 3600}
    # On Linux the clients read their option lines from $XDG_CONFIG_HOME/mosquitto_sub; the
    # Windows build reads %USERPROFILE%\mosquitto_sub.conf (the script sets USERPROFILE).
    (tmp_path / "mosquitto_sub").write_text("\n".join(
        expand(line, values) for line in ps_array("ConnectionOptions") + ps_array("WillOptions"))
        + "\n")
    argv = [expand(a, values) for a in ps_array("SubscriberArgs")]
    watcher = Watcher(mqtt_broker.host, mqtt_broker.port, f"{prefix}/status")
    proc = subprocess.Popen(["mosquitto_sub", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={"XDG_CONFIG_HOME": str(tmp_path),
                                                         "PATH": "/usr/bin:/bin"})
    try:
        lines = read_lines(proc)
        # The agent's start: "offline" retained; its echo through the subscriber proves the
        # subscription (and the Will) are in place, and is answered with "online".
        watcher.publish(f"{prefix}/status", json.dumps({"state": "offline", "agent": agent}),
                        retain=True)
        retained, text = next_message(lines, f"{prefix}/status")
        assert json.loads(text)["state"] == "offline"
        watcher.publish(f"{prefix}/status", json.dumps({"state": "online", "agent": agent}),
                        retain=True)
        assert json.loads(next_message(lines, f"{prefix}/status")[1])["state"] == "online"
        watcher.drain(0.5)

        # Quiet for longer than the old -W 5: the process stays, no Will is published.
        time.sleep(6.5)
        assert proc.poll() is None, proc.stderr.read().decode()
        assert [m for m in watcher.drain(0.5) if "will-" in m[1]] == []

        command = json.dumps({"v": 1, "id": "c-1", "reason": "a b; $(x) `y` <>&'{}"})
        watcher.publish(f"{prefix}/cmd", command)
        assert next_message(lines, f"{prefix}/cmd") == (False, command)
        watcher.publish(f"{prefix}/cmd", command, retain=True)
        assert next_message(lines, f"{prefix}/cmd") == (True, command)
        watcher.publish(f"{prefix}/cmd", "", retain=True)
        watcher.publish(f"{prefix}/supply", json.dumps({"agent": agent, "on_battery": True}),
                        retain=True)
        assert json.loads(next_message(lines, f"{prefix}/supply")[1])["on_battery"] is True

        # The network fails: now, and only now, the broker publishes the Will.
        proxy.cut()
        wills = [m for m in watcher.drain(5) if "will-" in m[1]]
        assert wills and json.loads(wills[0][1])["state"] == "offline" and wills[0][2]
        # mosquitto_sub reconnects by itself and hands the Will to the script as a line: the
        # "offline" that the script answers with "online" after a reconnect.
        assert proc.poll() is None
        retained, text = next_message(lines, f"{prefix}/status", timeout=15)
        assert json.loads(text)["host"] == "will-" + agent
    finally:
        proc.kill()
        proc.wait()
        watcher.publish(f"{prefix}/supply", "", retain=True)
        watcher.close()
        proxy.close()


def test_subscriber_arguments_are_plain_tokens_and_never_end_the_process():
    """-W/-C/-E would end mosquitto_sub (and -W publishes the Will when it does); a token with a
    space or quote would need Windows command-line quoting, which the script does not do."""
    args = ps_array("SubscriberArgs")
    assert not {"-W", "-C", "-E", "--retained-only"} & set(args)
    for arg in args:
        assert re.fullmatch(r"[A-Za-z0-9_.,/%{}:+-]+", arg), arg
    for flag in ("-c", "--retain-as-published"):
        assert flag in args
    pairs = dict(zip(args, args[1:]))
    assert (pairs["-i"], pairs["-q"], pairs["-x"]) == ("{client_id}", "1", "{session_expiry}")
    assert [args[i + 1] for i, a in enumerate(args) if a == "-t"] == [
        "{prefix}/cmd", "{prefix}/supply", "{prefix}/status"]
    assert ps_array("WillOptions") == ["--will-topic {prefix}/status", "--will-qos 1",
                                       "--will-retain", "--will-payload {offline_status}"]
    # It is started once per run of the process, never in a loop of short runs.
    assert len(re.findall(r"New-ClientProcess \$MosquittoSub", SCRIPT)) == 1


def test_option_files_are_where_the_windows_clients_read_them():
    """Mosquitto 2.0's Windows clients read %USERPROFILE%\\mosquitto_sub.conf and
    mosquitto_pub.conf (client/client_shared.c); XDG_CONFIG_HOME is read on POSIX only."""
    body = ps_function("Write-ClientConfig")
    assert "'mosquitto_sub.conf'" in body and "'mosquitto_pub.conf'" in body
    assert "$psi.EnvironmentVariables['USERPROFILE'] = $ClientConfigDir" in ps_function(
        "New-ClientProcess")
    assert "XDG_CONFIG_HOME" not in SCRIPT
    # Without a byte order mark, which would spoil the first option.
    assert "WriteAllLines" in body and "Set-Content" not in body


# -- the contract tables --------------------------------------------------------------------
@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"])
def test_canonical_form_and_signature_as_the_script_states_them(vector):
    header, fields = ps_scalar("CanonicalHeader"), tuple(ps_array("SignedFields"))
    assert re.search(r'^\$CanonicalSeparator = "`n"$', SCRIPT, re.M)
    assert fields == SIGNED_FIELDS
    body = ps_function("Get-CanonicalText")
    assert "@($CanonicalHeader)" in body and "foreach ($field in $SignedFields)" in body
    assert "[string]$C[$field]" in body and "-join $CanonicalSeparator" in body
    text = "\n".join([header] + [str(vector["command"][f]) for f in fields])
    assert text == vector["canonical"]
    mac = ps_function("Get-Hmac")
    assert "HMACSHA256" in mac and mac.count("[Text.Encoding]::UTF8.GetBytes") == 2
    assert "ToString('x2')" in mac
    sig = hmac.new(vector["key"].encode("utf-8"), text.encode("utf-8"), hashlib.sha256)
    assert sig.hexdigest() == vector["sig"]
    check = ps_function("Test-Signature")
    assert "ToLowerInvariant()" in check and "Get-Hmac $Key (Get-CanonicalText $C)" in check


def test_alphabet_and_limits_match_the_contract_and_the_linux_agent():
    safe = ps_scalar("SafeText")
    script_class = re.compile(re.fullmatch(r"\\A(\[.*\])\*\\z", safe).group(1))
    # The Linux agent always fullmatches its pattern (a `$` would admit a final newline).
    linux_class = re.compile(re.search(r"SAFE_TEXT = re.compile\(r'(\[.*?\])\*'\)", LINUX)
                             .group(1))
    assert "SAFE_TEXT.match(" not in LINUX and "SAFE_TEXT.fullmatch(" in LINUX
    schema = json.loads((REPO / "agents/contract/command.schema.json").read_text())
    schema_class = re.compile(re.fullmatch(r"\^(\[.*\])\*\$",
                                           schema["properties"]["reason"]["pattern"]).group(1))
    for code in range(0x300):
        ch = chr(code)
        assert bool(script_class.fullmatch(ch)) == bool(linux_class.fullmatch(ch)) == bool(
            schema_class.fullmatch(ch)), hex(code)
    pattern = dotnet_regex(safe)
    assert pattern.match("soc_min 9 <= 10; `id` $(x) 'q'") and not pattern.match("ok\n")
    assert re.search(r"^\$MaxText = 200$", SCRIPT, re.M)
    assert re.search(r"^\$MaxPayload = 4096$", SCRIPT, re.M)
    assert re.search(r"^\$MaxDelaySec = 86400$", SCRIPT, re.M)
    agent = dotnet_regex(ps_scalar("AgentIdPattern"))
    assert agent.pattern.replace("\\A", "^").replace("\\Z", "$") == (
        schema["properties"]["agent"]["pattern"])
    assert tuple(ps_array("StringFields")) == ("id", "agent", "action", "episode_id",
                                                "cancels", "reason", "sig")
    assert tuple(ps_array("IntFields")) == ("v", "delay_sec", "ttl_sec", "issued_at")
    assert tuple(ps_array("Actions")) == tuple(schema["properties"]["action"]["enum"])


def _linux_rejections() -> list[tuple[str, str]]:
    handle = re.search(r"    def handle\(self.*?\n    def ", LINUX, re.S).group(0)
    found = re.findall(r'self\.ack\(command_id, "(\w+)",\s*(f?"[^"]*")\)', handle)
    rows = [(status, detail.lstrip("f").strip('"')) for status, detail in found]
    return rows[:[d for _, d in rows].index("duplicate") + 1]


def test_rejection_order_is_the_contracts_and_the_linux_agents():
    rows = verdict_rows()
    assert [name for name, _, _ in rows] == [
        "malformed", "retained", "wrong_agent", "missing_signature", "bad_signature",
        "expired", "future", "duplicate"]
    mine = [(status, detail.replace("{0}", "{exc}")) for _, status, detail in rows]
    assert mine == _linux_rejections()
    # The contract lists them in the same order, as `status`, `detail` pairs.
    section = CONTRACT.split("### What an agent does with a command, in this order")[1]
    section = section.split("\n7. ")[0]
    positions = [section.index(f"`{d.split('{')[0].rstrip()}") for _, _, d in rows]
    assert positions == sorted(positions), positions
    # Get-Verdict applies them in table order and stops at the first.
    verdict = ps_function("Get-Verdict")
    assert "foreach ($rule in $Verdicts)" in verdict and "return [pscustomobject]" in verdict


def test_malformed_details_use_the_linux_agents_words():
    def normal(text):
        return re.sub(r"\{[^}]*\}", "{}", text)

    linux = {normal(m) for m in re.findall(r'raise ValueError\(f?"([^"]+)"\)',
                                           re.search(r"def parse_command.*?\n\n\n", LINUX,
                                                     re.S).group(0))}
    body = ps_function("ConvertTo-Command")
    mine = {re.sub(r"\$\(\$o\['\w+'\]\)|\$f", "{}", m)
            for m in re.findall(r'\$c\.Problem = (?:"([^"]*)"|\'([^\']*)\')', body) for m in m if m}
    assert mine == linux


def test_settings_have_the_linux_agents_names_defaults_and_ranges():
    linux = {name: (default, low, high) for name, default, low, high in re.findall(
        r'_int\(env, "(\w+)", ([\w* ]+), ([\w* ]+), ([\w* ]+)\)', LINUX)}
    checked = 0
    for name, default, low, high in re.findall(
            r"IntSetting '(\w+)' (\d+) (\d+) (\d+)", SCRIPT):
        if name in linux:
            assert tuple(int(x) for x in (default, low, high)) == tuple(
                eval(x, {"__builtins__": {}}) for x in linux[name]), name  # noqa: S307
            checked += 1
    assert checked == 4  # MQTT_PORT's default depends on TLS in both


def test_default_commands_and_action_plan():
    defaults = dict(re.findall(r"^\s+(\w+_CMD)\s+= '([^']*)'$",
                               re.search(r"^\$DefaultCommands = \[ordered\]@\{(.*?)^\}", SCRIPT,
                                         re.M | re.S).group(1), re.M))
    assert defaults == {"SHUTDOWN_CMD": "shutdown.exe /s /f /t {delay_sec}",
                        "ABORT_CMD": "shutdown.exe /a", "HALT_CMD": ""}
    assert "`shutdown.exe /s /f /t N`" in CONTRACT and "`shutdown.exe /a`" in CONTRACT
    plan = ps_function("Get-ActionPlan")
    assert plan.startswith("function Get-ActionPlan([string]$Stage, [int]$DelaySec)")
    steps = set(re.findall(r"Step = '(\w+)'", plan)) | {"pre_shutdown_<n>"}
    assert "Step = \"pre_shutdown_$($PreCommands[$n].N)\"" in plan
    contract_steps = set(re.findall(r"`(\w+(?:_<n>)?)`", CONTRACT.split("### Dry run")[1]
                                    .split("## Ack")[0])) & (steps | {"failsafe_shutdown"})
    assert contract_steps == {"shutdown", "pre_shutdown_<n>", "abort", "failsafe_shutdown",
                              "halt"}  # `halt`: the Windows agent's optional HALT_CMD
    assert steps == contract_steps
    # Split-Command: the window plus PRE_SHUTDOWN_TIMEOUT_SEC per pre-shutdown command.
    assert "$halt = $DelaySec + $PreTimeout * $PreCommands.Count" in ps_function("Split-Command")
    # Every local command comes from the plan; the halt only after the pre-shutdown commands.
    assert re.findall(r"Invoke-Step \$(\w+)", SCRIPT) == ["step"] * len(
        re.findall(r"Invoke-Step \$", SCRIPT))
    commit = ps_function("Invoke-Commit")
    assert commit.index("Get-ActionPlan 'commit'") < commit.index("Send-Ack") < commit.index(
        "Get-ActionPlan 'halt'")
    failsafe = ps_function("Invoke-Failsafe")
    assert failsafe.index("Get-ActionPlan 'failsafe'") < failsafe.index("Get-ActionPlan 'halt'")
    # Accepting a shutdown: the id on disk first, then the OS timer, then the window.
    shutdown = SCRIPT[SCRIPT.index("        'shutdown' {"):]
    assert (shutdown.index("Remember $id") < shutdown.index("Get-ActionPlan 'accept'")
            < shutdown.index("Write-DurableFile $PendingFile"))
    for forbidden in ("Invoke-Expression", "iex ", "Start-Process", "[scriptblock]::Create",
                      "-EncodedCommand"):
        assert forbidden not in SCRIPT


def test_dry_run_entries_have_the_linux_agents_fields():
    body = ps_function("Invoke-Step")
    mine = re.findall(r"(\w+) = ", re.search(r"\[ordered\]@\{(.*?)\}\)\)", body, re.S).group(1))
    linux = re.findall(r'"(\w+)": ', re.search(r"entry = \{(.*?)\}", LINUX, re.S).group(1))
    assert mine == linux == ["ts", "agent", "command_id", "step", "argv"]
    assert "Add-DurableLine $DryRunLog" in body
    assert "$stream.Flush($true)" in ps_function("Add-DurableLine")
    assert "Add-DurableLine $ExecutedFile" in ps_function("Remember")


def test_comparisons_are_case_sensitive():
    """PowerShell's -eq, -match, -in, switch ... ignore case (and -match with IgnoreCase lets
    non-ASCII letters such as the Kelvin sign through an ASCII class); the contract does not."""
    code = "\n".join(line for line in SCRIPT.splitlines() if not line.lstrip().startswith("#"))
    loose = re.findall(r"(?<![\w-])-(?:eq|ne|i?match|i?notmatch|in|notin|contains|notcontains|"
                       r"like|notlike|replace|split)\b", code, re.I)
    assert loose == []
    assert re.findall(r"(?<![\w\[-])switch\b(?! -CaseSensitive)", code) == []


def test_failsafe_follows_the_linux_semantics():
    timers = ps_function("Invoke-Timers")
    assert ("$FailsafeAfter -gt 0 -and -not $FailsafeFired -and $OnBattery -and "
            "$null -cne $DisconnectedSince") in timers
    assert "$t - $DisconnectedSince -ge $FailsafeAfter" in timers
    # Only a JSON true is "on battery"; only a connection that was up can be lost.
    line = ps_function("Receive-Line")
    assert "$state['on_battery'] -is [bool] -and $state['on_battery']" in line
    assert "if ($Connected) {" in ps_function("Set-Lost")


def test_every_setting_is_documented():
    names = set(re.findall(r"(?:Setting|IntSetting|BoolSetting) '(\w+)'", SCRIPT))
    names |= set(re.findall(r"Setting \"(\w+)_\$n\"", SCRIPT))
    names.add("COMMAND_SIGNING_KEY")
    example, doc = ENV_EXAMPLE.read_text(), DOC.read_text()
    for name in sorted(names):
        name = name.rstrip("_")
        assert name in example, f"{name} is not in {ENV_EXAMPLE.name}"
        assert f"`{name}" in doc, f"{name} is not in docs/agent-windows.md"


def test_task_runs_as_system_at_startup_at_normal_priority():
    ns = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
    root = ET.parse(TASK).getroot()
    assert root.find(".//t:BootTrigger", ns) is not None
    assert root.find(".//t:Principal/t:UserId", ns).text == "S-1-5-18"
    assert "ecoflow-agent.ps1" in root.find(".//t:Exec/t:Arguments", ns).text
    assert root.find(".//t:Exec/t:Command", ns).text == "powershell.exe"
    # The default task priority (7) is below normal.
    assert root.find(".//t:Settings/t:Priority", ns).text == "4"
