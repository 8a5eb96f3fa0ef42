"""A private Mosquitto broker (MQTT v5) on free ports: plain, or with users, ACL and TLS."""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from testbed.ports import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ACL = REPO / "compose" / "mosquitto" / "acl"


class MosquittoNotFound(RuntimeError):
    pass


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )
    if not path:
        raise MosquittoNotFound(
            "mosquitto not found: install it (Debian: apt-get install mosquitto mosquitto-clients)"
        )
    return path


def find_dynsec_plugin() -> str:
    """Mosquitto's dynamic-security plugin (Debian's mosquitto package ships it)."""
    for candidate in ("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
                      "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
                      "/usr/lib/mosquitto_dynamic_security.so"):
        if os.path.exists(candidate):
            return candidate
    raise MosquittoNotFound("mosquitto_dynamic_security.so not found: install Debian's mosquitto")


@dataclass
class MosquittoServer:
    """One broker. `users` (name -> password) turns on authentication and the ACL file;
    `tls` adds a TLS listener with a freshly generated CA.

    A restart (`halt()` then `start()`) keeps the ports and the CA, and rewrites the password
    file from `users`: change a password in `users` and restart to rotate it."""

    users: dict[str, str] | None = None
    acl_file: Path | None = None
    # Instead of the ACL file: Mosquitto's dynamic-security plugin with these allowances per
    # user ((acltype, topic pattern): subscribePattern, publishClientReceive,
    # publishClientSend), everything else denied. Unlike the ACL file, which grants every
    # subscription and filters what is delivered, the plugin refuses a subscription it does
    # not allow in its SUBACK, as EMQX-style brokers do.
    dynsec_acls: dict[str, list[tuple[str, str]]] | None = None
    tls: bool = False
    persistence: bool = False
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ecoflow-mqtt-")))

    def __post_init__(self):
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls_port = free_port() if self.tls else None
        self.tls_files = None
        self._proc: subprocess.Popen | None = None
        self.logfile = self.base / "mosquitto.log"

    def start(self) -> MosquittoServer:
        binary = find_mosquitto()
        lines = [
            "per_listener_settings false",
            "persistence true" if self.persistence else "persistence false",
            f"persistence_location {self.base}/",
            "autosave_interval 1",
            f"log_dest file {self.logfile}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"user {getpass.getuser()}",
            # Mosquitto drops QoS 1 messages beyond this per-client queue; a consumer that
            # acks after each database commit must not lose messages to a burst.
            "max_queued_messages 1000000",
        ]
        if self.users is not None and self.dynsec_acls is not None:
            # Written anew on every start, as the password file below.
            lines += ["allow_anonymous false", f"plugin {find_dynsec_plugin()}",
                      f"plugin_opt_config_file {self._write_dynsec()}"]
        elif self.users is not None:
            pwfile = self.base / "passwd"
            # Written anew on every start: a user removed from `users` loses access.
            pwfile.unlink(missing_ok=True)
            pwfile.touch(mode=0o600)
            passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
            for name, password in self.users.items():
                subprocess.run([passwd, "-b", str(pwfile), name, password], check=True,
                               capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
            lines.append(f"acl_file {self.acl_file or DEFAULT_ACL}")
        else:
            lines.append("allow_anonymous true")
        lines.append(f"listener {self.port} {self.host}")
        if self.tls:
            from testbed.tls import make_ca_and_server_cert

            # Generated once: clients that trust the CA keep trusting it across restarts.
            if self.tls_files is None:
                self.tls_files = make_ca_and_server_cert(self.base / "tls")
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"cafile {self.tls_files.ca_cert}",
                f"certfile {self.tls_files.server_cert}",
                f"keyfile {self.tls_files.server_key}",
                "tls_version tlsv1.2",
            ]
        conf = self.base / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        self._proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            wait_for_port(self.port)
            if self.tls_port:
                wait_for_port(self.tls_port)
        except TimeoutError:
            err = self._proc.stderr.read().decode() if self._proc.poll() is not None else ""
            log = self.logfile.read_text() if self.logfile.exists() else ""
            self.stop()
            raise RuntimeError(f"mosquitto did not start: {err}{log}") from None
        return self

    def _write_dynsec(self) -> Path:
        """The dynamic-security plugin's file: a client per user (its password hashed as the
        plugin stores it) with a role holding its allowances; defaults deny."""
        clients, roles = [], []
        for name, password in (self.users or {}).items():
            salt = secrets.token_bytes(12)  # the plugin's salt length
            digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, dklen=64)
            clients.append({"username": name, "roles": [{"rolename": f"role-{name}"}],
                            "password": base64.b64encode(digest).decode(),
                            "salt": base64.b64encode(salt).decode(), "iterations": 101})
            roles.append({"rolename": f"role-{name}", "acls": [
                {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}
                for acltype, topic in (self.dynsec_acls or {}).get(name, [])]})
        path = self.base / "dynamic-security.json"
        path.write_text(json.dumps({
            "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                                 "subscribe": False, "unsubscribe": True},
            "clients": clients, "groups": [], "roles": roles}))
        path.chmod(0o600)
        return path

    def halt(self) -> None:
        """Stop the broker but keep its files (and persisted sessions) for a restart."""
        self._terminate()

    def stop(self) -> None:
        self._terminate()
        shutil.rmtree(self.base, ignore_errors=True)

    def _terminate(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> MosquittoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def random_users(*names: str) -> dict[str, str]:
    return {name: secrets.token_urlsafe(12) for name in names}
