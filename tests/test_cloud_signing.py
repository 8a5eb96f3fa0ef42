"""Developer API signing: EcoFlow's published test vector and flattening example
(PROTOCOL.md "Signing")."""

from __future__ import annotations

from collector.cloud.signing import business_string, sign, signed_headers, signing_string

AK = "Fp4SvIprYSDPXtYJidEtUAd1o"
SK = "WIbFEKre0s6sLnh4ei7SPUeYnptHG6V"
BODY = {"sn": "123456789", "params": {"cmdSet": 11, "id": 24, "eps": 0}}
STRING = ("params.cmdSet=11&params.eps=0&params.id=24&sn=123456789"
          "&accessKey=Fp4SvIprYSDPXtYJidEtUAd1o&nonce=345164&timestamp=1671171709428")
SIGN = "07c13b65e037faf3b153d51613638fa80003c4c38d2407379a7f52851af1473e"


def test_official_test_vector_string_and_signature():
    text = signing_string(BODY, AK, "345164", "1671171709428")
    assert text == STRING
    assert sign(SK, text) == SIGN


def test_signed_headers_carry_the_vector_signature():
    headers = signed_headers(AK, SK, BODY, nonce="345164", timestamp="1671171709428")
    assert headers == {"accessKey": AK, "nonce": "345164", "timestamp": "1671171709428",
                       "sign": SIGN}


def test_flattening_example():
    doc = {"name": "demo1", "ids": [1, 2, 3], "deviceInfo": {"id": 1},
           "deviceList": [{"id": 1}, {"id": 2}]}
    assert business_string(doc) == ("deviceInfo.id=1&deviceList[0].id=1&deviceList[1].id=2"
                                     "&ids[0]=1&ids[1]=2&ids[2]=3&name=demo1")


def test_without_business_parameters_only_the_auth_part_is_signed():
    assert signing_string(None, "ak", "1", "2") == "accessKey=ak&nonce=1&timestamp=2"
    assert signing_string({}, "ak", "1", "2") == "accessKey=ak&nonce=1&timestamp=2"


def test_query_parameters_sort_in_ascii_order():
    # Upper case sorts before lower case in ASCII; a locale-aware sort would not.
    assert business_string({"sn": "X", "Zeta": 1, "alpha": 2}) == "Zeta=1&alpha=2&sn=X"


def test_a_changed_secret_or_field_changes_the_signature():
    assert sign(SK + "x", STRING) != SIGN
    assert sign(SK, STRING.replace("eps=0", "eps=1")) != SIGN


def test_fresh_headers_use_new_nonces_and_the_current_time():
    import time

    a, b = signed_headers(AK, SK), signed_headers(AK, SK)
    assert a["nonce"] != b["nonce"] or a["timestamp"] != b["timestamp"]
    assert abs(int(a["timestamp"]) - time.time() * 1000) < 5000
    assert len(a["sign"]) == 64 and a["sign"] == a["sign"].lower()
