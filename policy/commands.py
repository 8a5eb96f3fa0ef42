"""Command payloads for the host agents: the contract's fields, the canonical form, the HMAC."""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass

ACTIONS = ("shutdown", "abort", "test")
CONTRACT_VERSION = 1
REASON_MAX = 200
# Printable ASCII without '"' and '\', so even the shell agent can read it without a JSON parser.
_NOT_ALLOWED_IN_REASON = re.compile(r'[^\x20-\x7e]|["\\]')


def clean_reason(text: str) -> str:
    """The reason as the contract allows it: disallowed characters dropped, at most 200."""
    return _NOT_ALLOWED_IN_REASON.sub("", text)[:REASON_MAX]


@dataclass(frozen=True)
class Command:
    agent: str
    action: str
    delay_sec: int
    ttl_sec: int
    issued_at: int  # Unix epoch seconds
    episode_id: str = ""
    cancels: str = ""
    reason: str = ""
    id: str = ""

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}")
        if not self.id:
            object.__setattr__(self, "id", str(uuid.uuid4()))
        object.__setattr__(self, "reason", clean_reason(self.reason))

    def canonical(self) -> str:
        """The signed text: the contract's fields in a fixed order, one per line."""
        return "\n".join(
            [
                "ecoflow-cmd-v1",
                self.agent,
                self.id,
                self.action,
                str(int(self.delay_sec)),
                str(int(self.ttl_sec)),
                str(int(self.issued_at)),
                self.episode_id,
                self.cancels,
                self.reason,
            ]
        )

    def payload(self, signing_key: str | None) -> dict:
        body = {
            "v": CONTRACT_VERSION,
            "id": self.id,
            "agent": self.agent,
            "action": self.action,
            "delay_sec": int(self.delay_sec),
            "ttl_sec": int(self.ttl_sec),
            "issued_at": int(self.issued_at),
            "episode_id": self.episode_id,
            "cancels": self.cancels,
            "reason": self.reason,
        }
        if signing_key:
            body["sig"] = sign(self.canonical(), signing_key)
        return body


def sign(canonical: str, key: str) -> str:
    return hmac.new(key.encode("utf-8"), canonical.encode("utf-8"), hashlib.sha256).hexdigest()


def topic(agent: str, leaf: str = "cmd") -> str:
    return f"power-manager/{agent}/{leaf}"
