"""MQTT v5 client set-up shared by the services: credentials, TLS, persistent sessions, and a
receiving client that keeps up with a busy broker."""

from __future__ import annotations

import ssl
import struct
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SESSION_EXPIRY_SEC = 7 * 24 * 3600
# MQTT caps the receive window at 65535 unacknowledged messages.
MAX_RECEIVE_MAXIMUM = 65535
# One socket read takes this many bytes: a few hundred small messages instead of 3 reads each.
RECV_CHUNK = 256 * 1024
# paho doubles its reconnect wait up to this cap: with 30 s, a 15 s broker restart left the
# collector away for 16 s more. Retrying a local broker every 2 s costs it nothing.
RECONNECT_MIN_SEC = 1
RECONNECT_MAX_SEC = 2


class ReceivedMessage:
    """What `on_message` gets from a `FastReceiveClient` for a plain QoS 1 PUBLISH (no
    properties): the fields of paho's MQTTMessage that a consumer reads, without the
    per-message condition variable and Properties object paho builds for every message."""

    __slots__ = ("topic", "payload", "mid", "dup", "retain")
    qos = 1
    properties = None
    state = 0
    timestamp = 0.0

    def __init__(self, topic: str, payload: bytes, mid: int, dup: bool, retain: bool):
        self.topic = topic
        self.payload = payload
        self.mid = mid
        self.dup = dup
        self.retain = retain


class FastReceiveClient(mqtt.Client):
    """paho's client with a cheaper receive path, for a subscriber taking thousands of QoS 1
    messages a second (the collector's bridge source).

    paho reads every packet with three socket reads and one select(), builds a Properties
    object and a condition variable per message, and writes each PUBACK with a wake-up of its
    loop thread: together more CPU than decoding and storing the message. This client reads the
    socket in large chunks, decodes property-less QoS 1 PUBLISH packets itself (anything else
    takes paho's own path), and acknowledges a committed batch with one write (`ack_many`).
    It relies on paho 2.x internals (`_sock_recv`, `_in_packet`, `_packet_queue`);
    `fast_path_available()` says whether the installed paho still has them, and the client
    falls back to paho's behaviour when it does not.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._rsock = None
        self._fast = fast_path_available() and all(hasattr(self, name) for name in (
            "_in_packet", "_in_callback_mutex", "_on_message", "_userdata", "_protocol",
            "_manual_ack", "_last_bytes_received"))
        self._filtered = False  # message_callback_add() used: paho's dispatch by topic

    def message_callback_add(self, sub, callback) -> None:
        self._filtered = True
        super().message_callback_add(sub, callback)

    def _deliver(self, message: ReceivedMessage) -> None:
        """paho's _handle_on_message without its topic matching when nothing is filtered."""
        if self._filtered:
            self._handle_on_message(message)
            return
        on_message = self._on_message
        if on_message:
            with self._in_callback_mutex:
                try:
                    on_message(self, self._userdata, message)
                except Exception as err:
                    self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                    if not self.suppress_exceptions:
                        raise

    # -- reading ----------------------------------------------------------------------------
    def _sock_recv(self, bufsize: int) -> bytes:
        if not self._fast:
            return super()._sock_recv(bufsize)
        if self._rsock is not self._sock:  # a new connection: bytes of the old one are void
            self._rbuf, self._rpos, self._rsock = b"", 0, self._sock
        start = self._rpos
        if start >= len(self._rbuf):
            data = super()._sock_recv(max(bufsize, RECV_CHUNK))
            if len(data) <= bufsize:  # also the b"" that means the broker closed
                return data
            self._rbuf, start = data, 0
        end = min(start + bufsize, len(self._rbuf))
        self._rpos = end
        return self._rbuf[start:end]

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        # select() cannot see bytes already read into the buffer: handle them all before the
        # loop waits on the socket again (at most RECV_CHUNK bytes' worth of packets).
        rc = super().loop_read(max_packets)
        while (self._fast and rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None
               and self._rsock is self._sock and self._rpos < len(self._rbuf)):
            rc = super().loop_read(1)
        return rc

    def _packet_read(self) -> MQTTErrorCode:
        # A whole QoS 1 PUBLISH without properties waiting in the buffer is handled here, in
        # one step; anything else (other packets, a packet split across reads) goes the way
        # paho reads it, through _sock_recv and so through the same buffer.
        if not self._fast or self._in_packet["command"] or self._rsock is not self._sock:
            return super()._packet_read()
        buf, pos = self._rbuf, self._rpos
        end = len(buf)
        if end - pos < 2 or buf[pos] & 0xF6 != 0x32 or self._protocol != mqtt.MQTTv5:
            return super()._packet_read()
        length, shift, i = 0, 0, pos + 1
        while True:  # the remaining length, 1 to 4 bytes
            if i >= end or i > pos + 4:
                return super()._packet_read()
            byte = buf[i]
            i += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        stop = i + length
        if stop > end or length < 5:
            return super()._packet_read()
        topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
        if topic_end + 3 > stop or buf[topic_end + 2] != 0 or topic_end == i + 2:
            return super()._packet_read()  # properties, a topic alias, or malformed
        try:
            topic = buf[i + 2:topic_end].decode("utf-8")
        except UnicodeDecodeError:
            return super()._packet_read()
        command = buf[pos]
        mid = (buf[topic_end] << 8) | buf[topic_end + 1]
        self._rpos = stop
        self._last_bytes_received = time.monotonic()
        self._deliver(ReceivedMessage(topic, buf[topic_end + 3:stop], mid,
                                                bool(command & 0x08), bool(command & 0x01)))
        if self._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._send_puback(mid)

    def _handle_publish(self) -> MQTTErrorCode:
        # The same fast path for a PUBLISH paho has read itself (split across socket reads).
        header = self._in_packet["command"]
        if not self._fast or (header & 0x06) != 0x02 or self._protocol != mqtt.MQTTv5:
            return super()._handle_publish()  # QoS 0 and 2, MQTT 3: paho's own path
        packet = self._in_packet["packet"]
        try:
            topic_len = (packet[0] << 8) | packet[1]
            pos = 2 + topic_len
            mid = (packet[pos] << 8) | packet[pos + 1]
            has_properties = packet[pos + 2] != 0
            topic = bytes(packet[2:pos]).decode("utf-8")
        except (IndexError, UnicodeDecodeError):
            return super()._handle_publish()  # malformed: paho reports it
        if has_properties or topic_len == 0:
            return super()._handle_publish()
        message = ReceivedMessage(topic, bytes(packet[pos + 3:]), mid, bool(header & 0x08),
                                  bool(header & 0x01))
        self._deliver(message)
        if self._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._send_puback(mid)

    # -- acknowledging ----------------------------------------------------------------------
    def ack_many(self, mids: list[int]) -> None:
        """PUBACK every QoS 1 message id in `mids`, in one write (manual_ack clients)."""
        if not mids:
            return
        if not self._fast:
            for mid in mids:
                self.ack(mid, 1)
            return
        puback = int(mqtt.PUBACK)
        blob = b"".join([_PUBACK.pack(puback, 2, mid) for mid in mids])
        self._packet_queue(puback, blob, 0, 0)


_PUBACK = struct.Struct("!BBH")


def fast_path_available() -> bool:
    """Whether the installed paho has the internals FastReceiveClient builds on."""
    client = mqtt.Client
    return all(hasattr(client, name) for name in (
        "_sock_recv", "_handle_publish", "_packet_queue", "_handle_on_message", "loop_read",
        "_packet_read",
    ))


def make_client(client_id: str, user: str | None = None, password: str | None = None,
                tls_ca: str | None = None, manual_ack: bool = False,
                fast_receive: bool = False) -> mqtt.Client:
    cls = FastReceiveClient if fast_receive else mqtt.Client
    client = cls(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                 manual_ack=manual_ack)
    if user:
        client.username_pw_set(user, password)
    if tls_ca:
        client.tls_set(ca_certs=tls_ca, cert_reqs=ssl.CERT_REQUIRED)
    client.reconnect_delay_set(min_delay=RECONNECT_MIN_SEC, max_delay=RECONNECT_MAX_SEC)
    return client


def persistent_session(receive_maximum: int = 1000) -> Properties:
    """CONNECT properties for a session the broker keeps while we are away, and a receive
    window wide enough that acking after a batch commit does not throttle delivery."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY_SEC
    props.ReceiveMaximum = max(1, min(receive_maximum, MAX_RECEIVE_MAXIMUM))
    return props
