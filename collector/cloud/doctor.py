"""`ecoflow-collector doctor`: check the EcoFlow credentials end to end and say what is wrong.

It signs a request (key, secret, region, clock), lists the account's stations with EcoFlow's
online flag and model, fetches one reading per station and shows it decoded, gets the MQTT
broker credentials and logs in to the broker over verified TLS; with the app login it logs in,
connects and asks every station for its latest values. Each failure comes with advice in plain
words. Exit status 0 when everything works, 1 otherwise.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from collector.cloud.api import (
    API_HOSTS,
    AppApi,
    EcoflowApiError,
    MqttCredentials,
    OpenApi,
    host_name,
)
from collector.cloud.broker import cloud_client
from collector.cloud.plan import CloudPlan
from collector.decoders import DecodeError, decode
from collector.decoders.registry import unmapped_reason
from collector.settings import CollectorSettings
from servicekit.logging import redact, register_secret

SHOWN = (("soc_percent", "SoC", "%"), ("watts_in_sum", "in", "W"), ("watts_out_sum", "out", "W"),
         ("grid_connected", "grid", ""), ("remain_time_min", "remaining", "min"))


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def head(self, text: str) -> None:
        self.lines.append(f"\n{text}")

    def ok(self, text: str) -> None:
        self.lines.append(f"  ok    {text}")

    def info(self, text: str) -> None:
        self.lines.append(f"        {text}")

    def fail(self, text: str, advice: str) -> None:
        self.lines.append(f"  FAIL  {text}")
        self.lines.append(f"        -> {advice}")
        self.problems.append(advice)

    def text(self) -> str:
        tail = ("\nEverything works." if not self.problems else
                f"\n{len(self.problems)} problem(s); fix the first one first, it often causes "
                "the others.")
        return redact("\n".join(self.lines).lstrip("\n") + "\n" + tail)


def summary(raw: bytes, sn: str, source: str) -> str:
    try:
        readings = decode(raw, topic=None, source=source)
    except DecodeError as exc:
        return f"not decodable: {exc}"
    reason = unmapped_reason(readings[0]) if readings else None
    if reason:
        return f"stored raw, no columns: {reason}"
    if not readings or not readings[0].values:
        return "decoded, but it carries none of our columns (model not mapped yet?)"
    values = readings[0].values
    shown = []
    for column, label, unit in SHOWN:
        value = values.get(column)
        if value is None:
            continue
        if isinstance(value, bool):
            shown.append(f"{label} {'yes' if value else 'no'}")
        else:
            shown.append(f"{label} {round(value, 1):g}{(' ' + unit) if unit else ''}")
    filled = sum(v is not None for v in values.values())
    return f"{', '.join(shown) or 'no headline values'} ({filled} columns decoded)"


def _clock(report: Report, skew: float | None) -> None:
    if skew is None:
        return
    if abs(skew) > 60:
        report.fail(f"this machine's clock is {abs(skew):.0f} s "
                    f"{'behind' if skew > 0 else 'ahead of'} EcoFlow's",
                    "fix the system time (enable NTP): signed requests need a clock within "
                    "a few minutes of EcoFlow's")
    else:
        report.ok(f"clock within {abs(skew):.0f} s of EcoFlow's")


def _probe_regions(report: Report, s: CollectorSettings, host: str) -> None:
    """After an 8513 on a known EcoFlow host: does another regional host know the key?"""
    if host_name(host) not in API_HOSTS:
        return
    for other in API_HOSTS:
        if other == host_name(host):
            continue
        try:
            OpenApi(other, s.ecoflow_access_key or "", s.ecoflow_secret_key or "",
                    ca_file=s.ecoflow_tls_ca, timeout=8).device_list()
        except EcoflowApiError:
            continue
        report.info(f"{other} accepts this key: set ECOFLOW_API_HOST={other}")
        return
    report.info("no other EcoFlow API host accepts this key either: check the key pair")


def mqtt_login(creds: MqttCredentials, client_id: str, ca_file: str | None, timeout: float = 15,
               subscribe: list[str] | None = None, publish: list[tuple[str, str]] | None = None,
               wait_messages: int = 0) -> tuple[str | None, list[mqtt.MQTTMessage]]:
    """Connect with `creds` over verified TLS; None when the broker accepted the login, else the
    reason. Optionally subscribe, publish, and collect up to `wait_messages` messages."""
    done = threading.Event()
    got: list[mqtt.MQTTMessage] = []
    result: dict[str, str | None] = {}
    client = cloud_client(client_id, creds, ca_file, persistent=False)

    def on_connect(c, _u, _f, reason, _p):
        if reason.is_failure:
            result["error"] = str(reason)
            done.set()
            return
        result["error"] = None
        if subscribe:
            c.subscribe([(t, 1) for t in subscribe])
        for topic, payload in publish or []:
            c.publish(topic, payload, qos=1)
        if wait_messages == 0:
            done.set()

    def on_message(_c, _u, msg):
        got.append(msg)
        if len(got) >= wait_messages:
            done.set()

    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(creds.host, creds.port, keepalive=30)
    except ssl.SSLError as exc:
        return (f"TLS failed ({exc.reason or exc}); the broker's certificate was not accepted "
                "(ECOFLOW_TLS_CA names the CA when a proxy re-signs traffic)"), []
    except OSError as exc:
        return f"cannot reach {creds.host}:{creds.port} ({exc.strerror or exc})", []
    client.loop_start()
    done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    if "error" not in result:
        return f"no answer from {creds.host}:{creds.port} within {timeout:.0f} s", got
    return result["error"], got


def _stable_id(prefix: str, account: str) -> str:
    return f"{prefix}{hashlib.sha256(account.encode()).hexdigest()[:12]}"


def check_developer(report: Report, s: CollectorSettings, plan: CloudPlan) -> list[str]:
    """The developer API checks; returns the account's serial numbers ([] when unreadable)."""
    api = OpenApi(plan.open_host, s.ecoflow_access_key or "", s.ecoflow_secret_key or "",
                  ca_file=s.ecoflow_tls_ca)
    key = s.ecoflow_access_key or ""
    report.head(f"Developer API at {host_name(plan.open_host)} "
                f"(access key {key[:4]}...{len(key)} characters)")
    try:
        devices = api.device_list()
    except EcoflowApiError as exc:
        _clock(report, api.http.clock_skew_sec)
        report.fail(f"device/list: {exc.code} {exc.message}", exc.advice)
        if exc.code == "8513":
            _probe_regions(report, s, plan.open_host)
        return []
    _clock(report, api.http.clock_skew_sec)
    report.ok(f"signed request accepted; {len(devices)} station(s) on the account")
    wanted = set(plan.serials)
    for d in devices:
        state = "online" if str(d.get("online")) == "1" else "OFFLINE"
        mark = "" if not wanted or d["sn"] in wanted else "   (not collected: not in "\
            "ECOFLOW_DEVICE_SN / ECOFLOW_DEVICE_LIST)"
        report.info(f"{d['sn']}  {d.get('productName') or '?'}  "
                    f"\"{d.get('deviceName') or ''}\"  {state}{mark}")
    for sn in sorted(wanted - {d["sn"] for d in devices}):
        report.fail(f"{sn} is not on this account",
                    "check the serial number in ECOFLOW_DEVICE_SN / ECOFLOW_DEVICE_LIST, and that "
                    "the station is bound to the account these keys belong to")
    for d in devices:
        sn = d["sn"]
        if wanted and sn not in wanted:
            continue
        try:
            _data, raw = api.quota_all(sn)
        except EcoflowApiError as exc:
            report.fail(f"quota/all {sn}: {exc.code} {exc.message}", exc.advice)
            continue
        stale = "" if str(d.get("online")) == "1" else \
            " [offline: these are the last values EcoFlow kept, not live ones]"
        report.ok(f"quota/all {sn}: {summary(raw, sn, 'rest')}{stale}")
    try:
        creds = api.certification()
    except EcoflowApiError as exc:
        report.fail(f"certification: {exc.code} {exc.message}", exc.advice)
        return [d["sn"] for d in devices]
    register_secret(creds.password)
    report.ok(f"MQTT credentials: {creds.protocol}://{creds.host}:{creds.port} as {creds.user}")
    error, _ = mqtt_login(creds, _stable_id("ecoflow-ups-doctor-", key), s.ecoflow_tls_ca)
    if error:
        report.fail(f"MQTT login: {error}", _mqtt_advice(error))
    else:
        report.ok("MQTT broker accepted the login over TLS (certificate verified)")
    return [d["sn"] for d in devices]


def check_app(report: Report, s: CollectorSettings, plan: CloudPlan,
              devices: list[str]) -> None:
    user = s.ecoflow_account_user or ""
    api = AppApi(plan.app_host, user, s.ecoflow_account_password or "", ca_file=s.ecoflow_tls_ca)
    report.head(f"App login at {host_name(plan.app_host)} as {_masked_email(user)}")
    try:
        user_id = api.login()
        creds = api.certification()
    except EcoflowApiError as exc:
        report.fail(f"{exc.endpoint}: {exc.code} {exc.message}", exc.advice)
        return
    register_secret(creds.password)
    report.ok(f"logged in (user id {user_id}); MQTT credentials for "
              f"{creds.protocol}://{creds.host}:{creds.port}")
    if not devices:
        report.fail("no stations to ask", "name them in ECOFLOW_DEVICE_LIST (the app login "
                    "cannot list the account's stations)")
        return
    replies = [f"/app/{user_id}/{sn}/thing/property/get_reply" for sn in devices]
    requests_ = [(f"/app/{user_id}/{sn}/thing/property/get",
                  json.dumps({"id": 1000 + i, "version": "1.1", "from": "Android",
                              "moduleType": 0, "operateType": "latestQuotas", "params": {}}))
                 for i, sn in enumerate(devices)]
    client_id = f"ANDROID_{str(uuid.uuid5(uuid.NAMESPACE_URL, 'doctor:' + user)).upper()}" \
                f"_{user_id}"
    error, got = mqtt_login(creds, client_id, s.ecoflow_tls_ca, subscribe=replies,
                            publish=requests_, wait_messages=len(devices))
    if error:
        report.fail(f"MQTT login: {error}", _mqtt_advice(error))
        return
    report.ok("MQTT broker accepted the login over TLS (certificate verified)")
    answered = {m.topic.split("/")[3]: m.payload for m in got}
    for sn in devices:
        if sn not in answered:
            report.fail(f"{sn}: no answer to latestQuotas",
                        "the station may be offline or not bound to this account: check it in "
                        "the EcoFlow app")
            continue
        try:
            data = json.loads(answered[sn]).get("data") or {}
        except ValueError:
            data = {}
        if str(data.get("online")) == "0":
            report.fail(f"{sn}: EcoFlow says the station is offline",
                        "check its Wi-Fi connection in the EcoFlow app")
            continue
        report.ok(f"{sn}: {summary(answered[sn], sn, 'app_mqtt')}")


def _masked_email(address: str) -> str:
    name, _, domain = address.partition("@")
    return f"{name[:1]}***@{domain}" if domain else f"{address[:1]}***"


def _mqtt_advice(error: str) -> str:
    lowered = error.lower()
    if "user name or password" in lowered or "not authori" in lowered:
        return ("the broker refused the credentials EcoFlow just issued; too many different "
                "client ids today can cause this (EcoFlow allows about 10 a day): wait a day, "
                "and keep ECOFLOW_MQTT_CLIENT_ID unset so one stable id is used")
    if "tls" in lowered or "certificate" in lowered:
        return error
    return "check that outgoing TCP to the broker's port is allowed (firewall, proxy)"


def run(s: CollectorSettings, plan: CloudPlan) -> Report:
    report = Report()
    report.lines.append(f"EcoFlow doctor: sources {', '.join(plan.sources)}; stations "
                        f"{', '.join(plan.serials) or 'all on the account'}")
    devices = list(plan.serials)
    if plan.developer:
        listed = check_developer(report, s, plan)
        devices = devices or listed
    if "app_mqtt" in plan.sources:
        check_app(report, s, plan, devices)
    return report


def station_clocks(report: Report, url: str | None = None) -> None:
    """Each station's clock skew from the readings stored (servicekit.clock_skew), when the
    database (DATABASE_URL or POSTGRES_*) is reachable. A skew is no failure: the policy
    measures age by receipt; it is shown so a wrong station clock is seen."""
    import psycopg

    from servicekit.clock_skew import NOTABLE_SEC, describe, station_skews
    from servicekit.settings import database_settings

    try:
        url = url or database_settings().libpq_url()
        with psycopg.connect(url, connect_timeout=3) as conn:
            rows = station_skews(conn)
    except Exception as exc:  # noqa: BLE001 (the database is optional here)
        text = str(exc).strip().splitlines()
        report.head("Station clocks")
        report.info(f"not checked: database not reachable ({text[0] if text else type(exc)})")
        return
    report.head("Station clocks (device time against receipt, stored readings)")
    if not rows:
        report.info("no readings with a receive time in the last day")
    for row in rows:
        name = f"{row['device_sn']}" + (f" \"{row['name']}\"" if row["name"] else "")
        line = f"{name}: {describe(row)}"
        if row["skew_sec"] is not None and abs(row["skew_sec"]) > NOTABLE_SEC:
            report.info(f"{line}; check the station's time (stations set it from EcoFlow's"
                        " cloud): Grafana shows its readings shifted by as much")
        else:
            report.ok(line)


def source_liveness(report: Report, s: CollectorSettings, url: str | None = None) -> None:
    """Each station's sources, fresh / quiet / stale by the age of their newest stored reading
    (collector.sources.liveness), when the database is reachable. A station without a fresh
    source fails: the policy would act on frozen values."""
    import psycopg

    from collector.sources.liveness import (
        FRESH,
        STALE,
        periods_from_settings,
        states_from_db,
        station_verdicts,
    )
    from servicekit.settings import database_settings

    try:
        url = url or database_settings().libpq_url()
        with psycopg.connect(url, connect_timeout=3) as conn:
            entries = states_from_db(conn, periods_from_settings(s), s.liveness_quiet_periods,
                                     s.liveness_stale_periods)
    except Exception as exc:  # noqa: BLE001 (the database is optional here)
        text = str(exc).strip().splitlines()
        report.head("Liveness")
        report.info(f"not checked: database not reachable ({text[0] if text else type(exc)})")
        return
    report.head("Liveness (newest stored reading per station and source, by receive time)")
    if not entries:
        report.info("no readings in the last day")
    for e in entries:
        report.info(e.describe())
    for sn, best in sorted(station_verdicts(entries).items()):
        if best.state == FRESH:
            report.ok(f"{sn}: fresh from {best.source}")
        elif best.state == STALE:
            report.fail(f"{sn}: stale, no source delivered for {best.age:.0f} s",
                        "check the station is online in the EcoFlow app and the collector is "
                        "running; a connected source can still deliver nothing (pushes stop "
                        "when no app asks): with developer keys the collector polls REST "
                        "quota/all meanwhile (docs/ecoflow-cloud-liveness.md)")
        else:
            report.info(f"{sn}: quiet, newest reading {best.age:.0f} s ago from {best.source}")


def main(argv: list[str]) -> int:
    import argparse

    from collector.cloud.plan import cloud_plan
    from collector.settings import collector_settings
    from servicekit.settings import SettingsError

    argparse.ArgumentParser(prog="ecoflow-collector doctor", description=__doc__.split("\n")[0]
                            ).parse_args(argv)
    try:
        s = collector_settings(sources="ecoflow")
        for secret in (s.ecoflow_secret_key, s.ecoflow_account_password, s.ecoflow_access_key):
            register_secret(secret)
        plan = cloud_plan(s)
    except SettingsError as exc:
        print(exc)
        return 2
    started = time.monotonic()
    report = run(s, plan)
    station_clocks(report)
    source_liveness(report, s)
    print(report.text())
    print(f"(checked in {time.monotonic() - started:.1f} s)")
    return 1 if report.problems else 0
