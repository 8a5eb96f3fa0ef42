"""The command payload and its signature, exactly as docs/command-contract.md says."""

from __future__ import annotations

import hashlib
import hmac

from policy.commands import Command, clean_reason


def test_signature_is_hmac_sha256_over_the_canonical_lines():
    cmd = Command("nas-01", "shutdown", 120, 300, 1767225600, "R331ZEB4ZEA0012345-1767225000",
                  "", "soc_min 14.5 <= 15 on battery", id="8d0f0000-0000-4000-8000-000000000001")
    canonical = ("ecoflow-cmd-v1\nnas-01\n8d0f0000-0000-4000-8000-000000000001\nshutdown\n120\n"
                 "300\n1767225600\nR331ZEB4ZEA0012345-1767225000\n\nsoc_min 14.5 <= 15 on battery")
    assert cmd.canonical() == canonical
    body = cmd.payload("k3y")
    assert body["sig"] == hmac.new(b"k3y", canonical.encode(), hashlib.sha256).hexdigest()
    assert body == {"v": 1, "id": cmd.id, "agent": "nas-01", "action": "shutdown",
                    "delay_sec": 120, "ttl_sec": 300, "issued_at": 1767225600,
                    "episode_id": "R331ZEB4ZEA0012345-1767225000", "cancels": "",
                    "reason": "soc_min 14.5 <= 15 on battery", "sig": body["sig"]}


def test_unsigned_when_no_key_is_set():
    assert "sig" not in Command("nas-01", "test", 0, 60, 1767225600).payload(None)


def test_reason_is_printable_ascii_without_quotes_or_backslashes_and_short():
    assert clean_reason('Stüdy "pc" \\ ok\n') == "Stdy pc  ok"
    assert len(clean_reason("x" * 500)) == 200
    cmd = Command("nas-01", "abort", 0, 60, 1, cancels="abc", reason='a"b')
    assert cmd.reason == "ab" and cmd.canonical().endswith("\nabc\nab")
