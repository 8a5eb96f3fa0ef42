"""The fake EcoFlow cloud (testbed/fakecloud.py) behaves like the real one at the protocol level:
signing, error codes, app login, MQTT credentials, pushes, latestQuotas and password rotation.

Requests are signed here with a helper of this file's own, independent of the fake's code."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import itertools
import json
import logging
import queue
import secrets
import ssl
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import requests

from testbed.fakecloud import FakeDevice, FakeEcoflowCloud, hmac_sign, string_to_sign

PAYLOADS = Path(__file__).resolve().parent / "fixtures" / "payloads"

# EcoFlow's published test vector (PROTOCOL.md).
VECTOR_AK = "Fp4SvIprYSDPXtYJidEtUAd1o"
VECTOR_SK = "WIbFEKre0s6sLnh4ei7SPUeYnptHG6V"
VECTOR_NONCE = "345164"
VECTOR_TS = "1671171709428"
VECTOR_BODY = {"sn": "123456789", "params": {"cmdSet": 11, "id": 24, "eps": 0}}
VECTOR_STRING = ("params.cmdSet=11&params.eps=0&params.id=24&sn=123456789"
                 "&accessKey=Fp4SvIprYSDPXtYJidEtUAd1o&nonce=345164&timestamp=1671171709428")
VECTOR_SIGN = "07c13b65e037faf3b153d51613638fa80003c4c38d2407379a7f52851af1473e"

D2M, RIVER, DMAX, PS = "R351ZFB4HF6L0030", "R621ZEB4XECV1192", "DAEBZ5ZE4151148", "HW51ZOH4SF4U1217"


def payload(name: str):
    return json.loads((PAYLOADS / name).read_text())["payload"]


def payload_bytes(name: str) -> bytes:
    return json.dumps(payload(name)).encode()


def make_devices() -> list[FakeDevice]:
    return [
        FakeDevice(D2M, "DELTA 2 Max-0030", "DELTA 2 Max", product_type=81,
                   quota=payload("delta2max_app_mqtt_1.json")["data"]["quotaMap"],
                   open_messages=[payload_bytes("delta2max_open_mqtt_1_pdStatus.json"),
                                  payload_bytes("delta2max_open_mqtt_2_mpptStatus.json")]),
        FakeDevice(RIVER, "RIVER 2 Pro-1192", "RIVER 2 Pro", product_type=72,
                   quota=payload("river2pro_app_mqtt_1.json")["data"]["quotaMap"],
                   app_messages=[payload_bytes("river2pro_app_mqtt_2.json")]),
        FakeDevice(DMAX, "DELTA Max-1148", "DELTA Max", product_type=13, online=False,
                   quota=payload("deltamax_app_mqtt_1.json")["data"]["quotaMap"]),
        FakeDevice(PS, "PowerStream-1217", "PowerStream", developer_enabled=False,
                   quota=payload("powerstream_rest_quota_all_1.json")),
    ]


# -- a signing helper of the test's own ------------------------------------------------------
def _flat(value, prefix=""):
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flat(v, f"{prefix}.{k}" if prefix else k)]
    if isinstance(value, list):
        return [kv for i, v in enumerate(value) for kv in _flat(v, f"{prefix}[{i}]")]
    return [(prefix, str(value))]


def our_sign(secret_key: str, access_key: str, nonce: str, timestamp: str, params=None) -> str:
    pairs = sorted(_flat(params or {}), key=lambda kv: kv[0])
    text = "&".join([f"{k}={v}" for k, v in pairs]
                    + [f"accessKey={access_key}", f"nonce={nonce}", f"timestamp={timestamp}"])
    return hmac.new(secret_key.encode(), text.encode(), hashlib.sha256).hexdigest()


_nonces = itertools.count(100000 + secrets.randbelow(100000))


def call(cloud: FakeEcoflowCloud, method: str, path: str, *, params=None, body=None,
         access_key=None, secret_key=None, nonce=None, timestamp=None, sign=None,
         headers=None) -> requests.Response:
    ak = access_key or cloud.access_key
    nonce = nonce or str(next(_nonces))
    timestamp = timestamp or str(int(time.time() * 1000))
    signed = {"accessKey": ak, "nonce": nonce, "timestamp": timestamp,
              "sign": sign or our_sign(secret_key or cloud.secret_key, ak, nonce, timestamp,
                                       body if body is not None else params)}
    if body is not None:
        signed["Content-Type"] = "application/json;charset=UTF-8"
    return requests.request(method, cloud.api_url + path, params=params,
                            data=None if body is None else json.dumps(body),
                            headers=headers if headers is not None else signed,
                            verify=str(cloud.ca_file), timeout=5)


def code(response: requests.Response) -> str:
    assert response.status_code == 200
    return response.json()["code"]


# -- MQTT helper ---------------------------------------------------------------------------
class Mqtt:
    def __init__(self, cloud: FakeEcoflowCloud, username: str, password: str):
        self.messages: queue.Queue = queue.Queue()
        self.disconnected: queue.Queue = queue.Queue()
        connected: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"test-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311)
        self.client.username_pw_set(username, password)
        self.client.tls_set(ca_certs=str(cloud.ca_file), cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_connect = lambda _c, _u, _f, rc, _p: connected.put(rc)
        self.client.on_disconnect = lambda _c, _u, _f, rc, _p: self.disconnected.put(rc)
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload))
        self.client.connect(cloud.broker_host, cloud.broker_tls_port)
        self.client.loop_start()
        reason = connected.get(timeout=5)
        if reason.is_failure:
            self.close()
            raise ConnectionRefusedError(str(reason))

    def subscribe(self, topic: str) -> None:
        done: queue.Queue = queue.Queue()
        self.client.on_subscribe = lambda _c, _u, _mid, rcs, _p: done.put(rcs)
        self.client.subscribe(topic, qos=1)
        done.get(timeout=5)

    def publish(self, topic: str, data: dict) -> None:
        self.client.publish(topic, json.dumps(data), qos=1).wait_for_publish(5)

    def next(self, timeout: float = 3.0) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout)

    def drain(self, wait: float) -> list[tuple[str, bytes]]:
        items = []
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                items.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        return items

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def certificate(cloud: FakeEcoflowCloud) -> dict:
    return call(cloud, "GET", "/iot-open/sign/certification").json()["data"]


def app_certificate(cloud: FakeEcoflowCloud) -> dict:
    login = requests.post(cloud.api_url + "/auth/login", verify=str(cloud.ca_file), timeout=5,
                          json={"email": cloud.email, "scene": "IOT_APP", "userType": "ECOFLOW",
                                "password": base64.b64encode(cloud.password.encode()).decode()})
    token = login.json()["data"]["token"]
    answer = requests.get(cloud.api_url + "/iot-auth/app/certification", timeout=5,
                          headers={"Authorization": f"Bearer {token}"}, verify=str(cloud.ca_file))
    return answer.json()["data"]


@pytest.fixture(scope="module")
def cloud():
    with FakeEcoflowCloud(make_devices()) as fake:
        yield fake


@pytest.fixture
def clients():
    made: list[Mqtt] = []

    def connect(cloud, username, password) -> Mqtt:
        made.append(Mqtt(cloud, username, password))
        return made[-1]

    yield connect
    for client in made:
        client.close()


# -- signing -------------------------------------------------------------------------------
def test_official_test_vector_verifies_and_a_one_character_change_fails():
    text = string_to_sign(VECTOR_BODY, VECTOR_AK, VECTOR_NONCE, VECTOR_TS)
    assert text == VECTOR_STRING
    assert hmac_sign(VECTOR_SK, text) == VECTOR_SIGN
    assert our_sign(VECTOR_SK, VECTOR_AK, VECTOR_NONCE, VECTOR_TS, VECTOR_BODY) == VECTOR_SIGN
    changed = {"sn": "123456789", "params": {"cmdSet": 11, "id": 24, "eps": 1}}
    assert hmac_sign(VECTOR_SK, string_to_sign(changed, VECTOR_AK, VECTOR_NONCE, VECTOR_TS)) \
        != VECTOR_SIGN


def test_the_documented_flattening_example():
    body = {"name": "demo1", "ids": [1, 2, 3], "deviceInfo": {"id": 1},
            "deviceList": [{"id": 1}, {"id": 2}]}
    assert string_to_sign(body, "ak", "1", "2") == (
        "deviceInfo.id=1&deviceList[0].id=1&deviceList[1].id=2&ids[0]=1&ids[1]=2&ids[2]=3"
        "&name=demo1&accessKey=ak&nonce=1&timestamp=2")
    assert string_to_sign({}, "ak", "1", "2") == "accessKey=ak&nonce=1&timestamp=2"


def test_the_fake_accepts_the_official_test_vector_request_on_the_wire():
    device = FakeDevice("123456789", "DELTA Pro-6789", "DELTA Pro")
    with FakeEcoflowCloud([device], access_key=VECTOR_AK, secret_key=VECTOR_SK) as fake:
        # Put the fake's clock at the vector's timestamp.
        fake.clock_offset_sec = int(VECTOR_TS) / 1000 - time.time()
        accepted = call(fake, "PUT", "/iot-open/sign/device/quota", body=VECTOR_BODY,
                        nonce=VECTOR_NONCE, timestamp=VECTOR_TS, sign=VECTOR_SIGN)
        assert code(accepted) == "0"
        assert fake.set_quota_calls == [VECTOR_BODY]
        one_off = VECTOR_SIGN[:-1] + "f"
        refused = call(fake, "PUT", "/iot-open/sign/device/quota", body=VECTOR_BODY,
                       nonce="345165", timestamp=VECTOR_TS, sign=one_off)
        assert refused.json()["message"] == "signature is wrong"
        assert code(refused) == "8521" and fake.requests[-1]["reason"] == "sign does not match"
        assert len(fake.set_quota_calls) == 1


# -- open API endpoints --------------------------------------------------------------------
def test_certification_hands_out_the_tls_broker(cloud):
    response = call(cloud, "GET", "/iot-open/sign/certification")
    envelope = response.json()
    assert envelope["code"] == "0" and envelope["message"] == "Success" and envelope["tid"] == ""
    assert envelope["eagleEyeTraceId"]
    data = envelope["data"]
    assert data["certificateAccount"] == cloud.open_account
    assert data["certificateAccount"].startswith("open-")
    assert data["url"] == "127.0.0.1" == cloud.broker_host
    assert data["port"] == str(cloud.broker_tls_port) and data["protocol"] == "mqtts"
    assert response.headers["Content-Type"] == "application/json;charset=UTF-8"


def test_device_list_names_every_device_with_online_as_0_or_1(cloud):
    data = call(cloud, "GET", "/iot-open/sign/device/list").json()["data"]
    assert {d["sn"]: (d["deviceName"], d["online"], d["productName"]) for d in data} == {
        D2M: ("DELTA 2 Max-0030", 1, "DELTA 2 Max"), RIVER: ("RIVER 2 Pro-1192", 1, "RIVER 2 Pro"),
        DMAX: ("DELTA Max-1148", 0, "DELTA Max"), PS: ("PowerStream-1217", 1, "PowerStream")}


def test_quota_all_answers_the_flat_map_even_for_an_offline_device(cloud):
    online = call(cloud, "GET", "/iot-open/sign/device/quota/all", params={"sn": D2M}).json()
    assert online["code"] == "0" and online["data"]["pd.wattsInSum"] == 625
    offline = call(cloud, "GET", "/iot-open/sign/device/quota/all", params={"sn": DMAX}).json()
    assert offline["code"] == "0" and offline["data"]["pd.soc"] == cloud.devices[2].quota["pd.soc"]


def test_quota_all_refuses_unknown_devices_and_devices_not_opened_to_developers(cloud):
    unknown = call(cloud, "GET", "/iot-open/sign/device/quota/all", params={"sn": "NOPE"})
    assert code(unknown) != "0" and "data" not in unknown.json()
    closed = call(cloud, "GET", "/iot-open/sign/device/quota/all", params={"sn": PS}).json()
    assert closed["code"] == "1006"
    assert closed["message"] == "current device is not allowed to get device info"


def test_put_quota_records_the_signed_body(cloud):
    body = {"sn": D2M, "cmdCode": "YJ751_PD_AC_DSG_SET", "params": {"enabled": 1, "xboost": 0}}
    assert code(call(cloud, "PUT", "/iot-open/sign/device/quota", body=body)) == "0"
    assert cloud.set_quota_calls[-1] == body
    # Signed over another body: refused and not recorded.
    forged = call(cloud, "PUT", "/iot-open/sign/device/quota", body=body,
                  sign=our_sign(cloud.secret_key, cloud.access_key, "1", "2", {"sn": D2M}))
    assert code(forged) == "8521" and cloud.set_quota_calls[-1] == body
    assert len([c for c in cloud.set_quota_calls if c == body]) == 1


# -- signature errors ----------------------------------------------------------------------
def test_a_wrong_access_key_and_a_wrong_region_answer_8513(cloud):
    wrong = call(cloud, "GET", "/iot-open/sign/device/list", access_key="x" * 32)
    assert code(wrong) == "8513" and wrong.json()["message"] == "accessKey is invalid"
    cloud.region_ok = False
    try:
        region = call(cloud, "GET", "/iot-open/sign/device/list")
        assert code(region) == "8513" and region.json()["message"] == "accessKey is invalid"
    finally:
        cloud.region_ok = True
    assert code(call(cloud, "GET", "/iot-open/sign/device/list")) == "0"


def test_a_wrong_sign_answers_8521(cloud):
    wrong = call(cloud, "GET", "/iot-open/sign/device/list", secret_key="not-the-secret")
    assert code(wrong) == "8521" and wrong.json()["message"] == "signature is wrong"
    signed_for_river = our_sign(cloud.secret_key, cloud.access_key, "9", "9", {"sn": RIVER})
    params_changed = call(cloud, "GET", "/iot-open/sign/device/quota/all", params={"sn": D2M},
                          nonce="9", timestamp="9", sign=signed_for_river)
    assert code(params_changed) == "8521"
    assert cloud.requests[-1]["reason"] == "sign does not match"


def test_a_stale_timestamp_answers_8521(cloud):
    stale = str(int((time.time() - 400) * 1000))
    assert code(call(cloud, "GET", "/iot-open/sign/device/list", timestamp=stale)) == "8521"
    assert cloud.requests[-1]["reason"].startswith("timestamp -4")
    # The same holds when it is the server's clock that is off.
    cloud.clock_offset_sec = 1000
    try:
        assert code(call(cloud, "GET", "/iot-open/sign/device/list")) == "8521"
    finally:
        cloud.clock_offset_sec = 0


def test_a_replayed_nonce_answers_8521(cloud):
    first = call(cloud, "GET", "/iot-open/sign/device/list", nonce="424242")
    assert code(first) == "0"
    replay = call(cloud, "GET", "/iot-open/sign/device/list", nonce="424242")
    assert code(replay) == "8521" and cloud.requests[-1]["reason"] == "nonce reused"


def test_missing_signature_headers_are_refused_with_a_clear_message(cloud):
    bare = requests.get(cloud.api_url + "/iot-open/sign/device/list", headers={},
                        verify=str(cloud.ca_file), timeout=5)
    assert code(bare) not in ("0", "8513", "8521")
    assert "sign" in bare.json()["message"] and "nonce" in bare.json()["message"]


def test_the_date_header_follows_the_fakes_clock(cloud):
    cloud.clock_offset_sec = 3600
    try:
        response = requests.post(cloud.api_url + "/auth/login", json={},
                                 verify=str(cloud.ca_file), timeout=5)
    finally:
        cloud.clock_offset_sec = 0
    served = email.utils.parsedate_to_datetime(response.headers["Date"]).timestamp()
    assert abs(served - (time.time() + 3600)) < 5


def test_the_https_certificate_is_checked_against_the_ca(cloud):
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(cloud.api_url + "/iot-open/sign/device/list", timeout=5,
                     verify=ssl.get_default_verify_paths().cafile)


# -- app login -----------------------------------------------------------------------------
def test_login_then_app_certification(cloud):
    data = app_certificate(cloud)
    assert data["certificateAccount"] == cloud.app_account
    assert data["certificateAccount"].startswith("app-")
    assert data["url"] == "127.0.0.1" and data["port"] == str(cloud.broker_tls_port)
    assert data["protocol"] == "mqtts"
    login = requests.post(cloud.api_url + "/auth/login", verify=str(cloud.ca_file), timeout=5,
                          json={"email": cloud.email, "scene": "IOT_APP", "userType": "ECOFLOW",
                                "password": base64.b64encode(cloud.password.encode()).decode()})
    user = login.json()["data"]["user"]
    assert user["userId"] == cloud.user_id and len(cloud.user_id) == 19
    assert user["email"] == cloud.email


def test_a_wrong_password_or_token_is_refused(cloud):
    wrong = requests.post(cloud.api_url + "/auth/login", verify=str(cloud.ca_file), timeout=5,
                          json={"email": cloud.email, "scene": "IOT_APP", "userType": "ECOFLOW",
                                "password": base64.b64encode(b"guess").decode()})
    assert code(wrong) != "0" and wrong.json()["message"]
    for headers in ({}, {"Authorization": "Bearer made-up"}):
        answer = requests.get(cloud.api_url + "/iot-auth/app/certification", headers=headers,
                              verify=str(cloud.ca_file), timeout=5)
        assert code(answer) != "0" and "data" not in answer.json()


# -- MQTT ----------------------------------------------------------------------------------
def test_open_credentials_receive_a_pushed_quota_and_status_over_tls(cloud, clients):
    cert = certificate(cloud)
    sub = clients(cloud, cert["certificateAccount"], cert["certificatePassword"])
    sub.subscribe(f"/open/{cloud.open_account}/#")
    cloud.push(D2M)
    cloud.push(D2M, "open", b'{"params":{"soc":50}}')
    cloud.push(D2M, "status")
    assert sub.next() == (f"/open/{cloud.open_account}/{D2M}/quota",
                          cloud.devices[0].open_messages[0])
    assert sub.next() == (f"/open/{cloud.open_account}/{D2M}/quota", b'{"params":{"soc":50}}')
    topic, status = sub.next()
    assert topic == f"/open/{cloud.open_account}/{D2M}/status"
    assert json.loads(status)["params"]["status"] == 1


def test_the_open_account_reads_only_its_own_topics(cloud, clients):
    cert = certificate(cloud)
    sub = clients(cloud, cert["certificateAccount"], cert["certificatePassword"])
    sub.subscribe("/app/device/property/#")
    sub.subscribe("/open/open-someone-else/#")
    cloud.push(RIVER, "app")
    cloud.push(D2M, "open", b"{}")
    assert sub.drain(0.5) == []


def test_latest_quotas_gets_a_reply_with_the_quota_map_or_offline(cloud, clients):
    cert = app_certificate(cloud)
    app = clients(cloud, cert["certificateAccount"], cert["certificatePassword"])
    app.subscribe(f"/app/{cloud.user_id}/+/thing/property/get_reply")
    before = dict(cloud.latest_quotas_requests)
    request = {"version": "1.1", "moduleType": 0, "operateType": "latestQuotas", "params": {}}
    app.publish(f"/app/{cloud.user_id}/{D2M}/thing/property/get", {"id": 777, **request})
    topic, raw = app.next()
    reply = json.loads(raw)
    assert topic == f"/app/{cloud.user_id}/{D2M}/thing/property/get_reply"
    assert reply["id"] == 777 and reply["operateType"] == "latestQuotas" and reply["code"] == "0"
    assert reply["data"]["sn"] == D2M and reply["data"]["productType"] == 81
    assert reply["data"]["online"] == 1
    assert reply["data"]["quotaMap"] == cloud.devices[0].quota
    app.publish(f"/app/{cloud.user_id}/{DMAX}/thing/property/get", {"id": 778, **request})
    offline = json.loads(app.next()[1])
    assert offline["id"] == 778 and offline["data"]["online"] == 0
    assert "quotaMap" not in offline["data"]
    assert cloud.latest_quotas_requests[D2M] == before.get(D2M, 0) + 1
    assert cloud.latest_quotas_requests[DMAX] == before.get(DMAX, 0) + 1


def test_app_telemetry_flows_only_within_the_keepalive_window(cloud, clients):
    cert = app_certificate(cloud)
    app = clients(cloud, cert["certificateAccount"], cert["certificatePassword"])
    app.subscribe(f"/app/device/property/{RIVER}")
    app.subscribe(f"/app/{cloud.user_id}/{RIVER}/thing/property/get_reply")
    ocert = certificate(cloud)
    opener = clients(cloud, ocert["certificateAccount"], ocert["certificatePassword"])
    opener.subscribe(f"/open/{cloud.open_account}/{D2M}/quota")
    cloud.keepalive_window_sec = 1.0
    cloud.start_pushing(0.1)
    try:
        # Nobody asked: the open API pushes, the app side stays frozen.
        assert app.drain(0.6) == [] and opener.drain(0.1)
        app.publish(f"/app/{cloud.user_id}/{RIVER}/thing/property/get",
                    {"id": 1, "version": "1.1", "moduleType": 0, "operateType": "latestQuotas",
                     "params": {}})
        pushed = app.drain(0.7)
        topics = [topic for topic, _ in pushed]
        assert f"/app/{cloud.user_id}/{RIVER}/thing/property/get_reply" in topics
        assert (f"/app/device/property/{RIVER}", cloud.devices[1].app_messages[0]) in pushed
        time.sleep(0.6)  # the window closes
        app.drain(0.2)
        assert app.drain(0.5) == []
    finally:
        cloud.stop_pushing()
        cloud.keepalive_window_sec = 600


def test_rotation_refuses_the_old_password_and_accepts_the_new_one(clients, tmp_path):
    session = requests.Session()
    ca_copy = tmp_path / "ca.crt"
    with FakeEcoflowCloud(make_devices()) as fake:
        api_url = fake.api_url
        ca_copy.write_bytes(fake.ca_file.read_bytes())
        assert session.post(api_url + "/auth/login", json={}, verify=str(ca_copy), timeout=5).ok
        old_open, old_app = certificate(fake), app_certificate(fake)
        port, ca = fake.broker_tls_port, fake.ca_file.read_bytes()
        connected = clients(fake, old_open["certificateAccount"], old_open["certificatePassword"])
        fake.rotate_mqtt_password()
        connected.disconnected.get(timeout=5)  # existing connections are dropped
        connected.close()
        for old in (old_open, old_app):
            with pytest.raises(ConnectionRefusedError):
                Mqtt(fake, old["certificateAccount"], old["certificatePassword"])
        new_open, new_app = certificate(fake), app_certificate(fake)
        assert new_open["certificatePassword"] != old_open["certificatePassword"]
        assert new_app["certificatePassword"] != old_app["certificatePassword"]
        assert (fake.broker_tls_port, fake.ca_file.read_bytes()) == (port, ca)
        assert new_open["port"] == str(port)
        sub = clients(fake, new_open["certificateAccount"], new_open["certificatePassword"])
        sub.subscribe(f"/open/{fake.open_account}/{D2M}/quota")
        fake.push(D2M)
        assert sub.next()[0] == f"/open/{fake.open_account}/{D2M}/quota"
        clients(fake, new_app["certificateAccount"], new_app["certificatePassword"])
        secrets_now = fake.secrets()
        for value in (old_open, old_app, new_open, new_app):
            assert value["certificatePassword"] in secrets_now
    # Stopped means gone, kept-alive HTTPS connections included.
    with pytest.raises(requests.exceptions.ConnectionError):
        session.post(api_url + "/auth/login", json={}, verify=str(ca_copy), timeout=5)


# -- no secrets leak -----------------------------------------------------------------------
def test_the_fake_logs_and_records_no_secret(cloud, caplog):
    caplog.set_level(logging.DEBUG, logger="testbed.fakecloud")
    app_certificate(cloud)
    certificate(cloud)
    call(cloud, "GET", "/iot-open/sign/device/list", secret_key="wrong")
    call(cloud, "GET", "/iot-open/sign/device/quota/all", params={"sn": D2M})
    call(cloud, "PUT", "/iot-open/sign/device/quota", body={"sn": D2M, "params": {"x": 1}})
    requests.get(cloud.api_url + "/iot-open/sign/device/quota/all", verify=str(cloud.ca_file),
                 params={"sn": D2M, "secret": cloud.secret_key}, timeout=5)
    recorded = json.dumps(cloud.requests)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "testbed.fakecloud")
    values = cloud.secrets()
    assert cloud.secret_key in values and cloud.password in values
    assert len(values) >= 6  # secret key, password (plain and base64), device, 2 MQTT, token
    for value in values:
        assert value not in logged
        assert value not in recorded
    assert "/iot-open/sign/device/quota/all -> 0" in logged  # the fake did log the requests
