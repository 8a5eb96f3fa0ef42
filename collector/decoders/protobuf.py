"""Gen-3 protobuf payloads: the HeaderMessage envelope, the XOR rule, base64, routing by command.

One MQTT payload carries several headers; each header's `pdata` holds one message chosen by
(cmd_func, cmd_id). All headers of one payload are merged, in order, into one Reading: they
describe the same station at the same moment (a later header's value wins on overlap).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message

from ..proto import ecoflow_pb2 as pb
from . import delta_pro_ultra, gen3, panel2, powerocean, powerstream, smartplug, stream
from .models import model_for
from .reading import DecodeError, Reading, epoch_ts

# The src address of EcoFlow's cloud: its messages are never XOR-obfuscated.
_CLOUD_SRC = 32

# (cmd_func, cmd_id) -> message class for the routes that carry telemetry.
ROUTES: dict[tuple[int, int], type[Message]] = {
    (254, 21): pb.DisplayPropertyUpload,
    (254, 22): pb.RuntimePropertyUpload,
    (32, 2): pb.CmsHeartbeat,
    (32, 50): pb.BmsHeartbeat,
    (3, 50): pb.BmsHeartbeat,
    (20, 1): pb.InverterHeartbeat,
    (2, 1): pb.PlugHeartbeat,
    (12, 1): pb.Panel2TimeStat,
    (12, 32): pb.Panel2PushAndSet,
    (96, 1): pb.PowerOceanEmsHeartbeat,
    (96, 7): pb.PowerOceanBpStaReport,
    (96, 8): pb.PowerOceanEmsChangeReport,
}

# Routes whose message depends on the model: cmd_func 2 is the Smart Plug's (2/1 heartbeat) on
# a plug and the Delta Pro Ultra's own reports on that station. Without a model, ROUTES decide.
MODEL_ROUTES: dict[str, dict[tuple[int, int], type[Message]]] = {
    delta_pro_ultra.MODEL: {
        (2, 1): pb.DpuAppShowHeartbeat,
        (2, 2): pb.DpuBackendHeartbeat,
        (2, 4): pb.DpuBatteryPackReport,
    },
}

# Routes we recognise but that carry no column (set commands and replies, time tasks, other
# heartbeat variants): kept in raw as hex, not an error.
KNOWN_ROUTES = frozenset(
    {(254, 17), (254, 18), (20, 134), (3, 1), (3, 2), (3, 30), (32, 1), (32, 3), (32, 51),
     (32, 52)}
    | {(254, cmd_id) for cmd_id in range(23, 31)}
)


def header_message(header_fields: dict[str, Any], pdata: bytes) -> bytes:
    """A one-header envelope around `pdata`, for captures that kept only the inner message."""
    header = pb.Header()
    json_format.ParseDict(header_fields, header, ignore_unknown_fields=True)
    header.pdata = pdata
    return pb.HeaderMessage(header=[header]).SerializeToString()


def _plain_pdata(header: pb.Header) -> bytes:
    """pdata with the XOR obfuscation undone: enc_type 1 from a device XORs with seq's low byte."""
    if header.enc_type == 1 and header.src != _CLOUD_SRC:
        key = header.seq & 0xFF
        return bytes(b ^ key for b in header.pdata)
    return header.pdata


def _to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def parse(data: bytes) -> pb.HeaderMessage:
    """The HeaderMessage in `data`, or DecodeError when it is not one."""
    envelope = pb.HeaderMessage()
    try:
        envelope.ParseFromString(data)
    except (ProtobufDecodeError, ValueError, RuntimeError) as exc:
        raise DecodeError(f"not a protobuf HeaderMessage: {exc}") from exc
    if not envelope.header:
        raise DecodeError("protobuf payload has no header (field 1): not an EcoFlow message")
    return envelope


def decode(data: bytes, transport: str = "binary", model: str | None = None) -> Reading:
    """One merged Reading from every header in a HeaderMessage. `model` (from the topic's
    serial number; else the headers' device_sn) picks the message of model-specific routes."""
    envelope = parse(data)
    if model is None:
        model = next((model_for(h.device_sn) for h in envelope.header if h.device_sn), None)
    model_routes = MODEL_ROUTES.get(model or "", {})
    dpu_show: dict[str, Any] = {}
    dpu_backend: dict[str, Any] = {}
    dpu_packs: list[dict[str, Any]] = []
    panel_push: dict[str, Any] = {}
    panel_stat: dict[str, Any] = {}
    ocean_change: dict[str, Any] = {}
    ocean_heartbeat: dict[str, Any] = {}
    ocean_packs: list[dict[str, Any]] = []
    fields: dict[str, Any] = {}
    cms: dict[str, Any] = {}
    bms_packs: list[dict[str, Any]] = []
    inverter: dict[str, Any] = {}
    families: list[str] = []
    raw_headers: list[dict[str, Any]] = []
    device_sn = None
    ts = None
    known = 0

    for header in envelope.header:
        route = (header.cmd_func, header.cmd_id)
        entry = _to_dict(header)
        entry.pop("pdata", None)
        device_sn = device_sn or (header.device_sn or None)
        ts = ts or epoch_ts(header.time_snap if header.HasField("time_snap") else None)
        message_class = model_routes.get(route) or ROUTES.get(route)
        if message_class is None:
            if route in KNOWN_ROUTES:
                known += 1
            entry["pdataHex"] = header.pdata.hex()
            raw_headers.append(entry)
            continue
        message = message_class()
        try:
            message.ParseFromString(_plain_pdata(header))
        except (ProtobufDecodeError, ValueError, RuntimeError) as exc:
            raise DecodeError(
                f"header {route[0]}/{route[1]}: pdata is not a {message_class.__name__}: {exc}"
            ) from exc
        known += 1
        content = _to_dict(message)
        entry["message"] = message_class.__name__
        entry["pdata"] = content
        raw_headers.append(entry)
        if message_class in (pb.DisplayPropertyUpload, pb.RuntimePropertyUpload):
            fields.update(content)
            families.append(gen3.FAMILY)
        elif message_class is pb.CmsHeartbeat:
            cms.update(content.get("status", {}))
            families.append(gen3.FAMILY)
        elif message_class is pb.BmsHeartbeat:
            bms_packs.append(content)
            families.append(gen3.FAMILY)
        elif message_class is pb.DpuAppShowHeartbeat:
            dpu_show.update(content)
            families.append(delta_pro_ultra.FAMILY)
        elif message_class is pb.DpuBackendHeartbeat:
            dpu_backend.update(content)
            families.append(delta_pro_ultra.FAMILY)
        elif message_class is pb.DpuBatteryPackReport:
            dpu_packs.extend(content.get("bpInfo", []))
            families.append(delta_pro_ultra.FAMILY)
        elif message_class is pb.Panel2PushAndSet:
            panel_push.update(content)
            families.append(panel2.FAMILY)
        elif message_class is pb.Panel2TimeStat:
            panel_stat.update(content)
            families.append(panel2.FAMILY)
        elif message_class is pb.PowerOceanEmsChangeReport:
            ocean_change.update(content)
            families.append(powerocean.FAMILY)
        elif message_class is pb.PowerOceanEmsHeartbeat:
            ocean_heartbeat.update(content)
            families.append(powerocean.FAMILY)
        elif message_class is pb.PowerOceanBpStaReport:
            ocean_packs.extend(content.get("bpSta", []))
            families.append(powerocean.FAMILY)
        elif message_class is pb.InverterHeartbeat:
            inverter.update(content)
            families.append(powerstream.FAMILY)
        else:
            families.append(smartplug.FAMILY)

    if not known:
        routes = ", ".join(f"{h.cmd_func}/{h.cmd_id}" for h in envelope.header)
        raise DecodeError(f"protobuf: no header with a known cmd_func/cmd_id (saw {routes})")

    values: dict[str, Any] = {}
    packs: dict[str, float] = {}
    if gen3.FAMILY in families:
        # A display upload with Stream's own fields is a Stream: same battery fields, other
        # power fields (361 is PV input 1 there, not the PV total).
        if not stream.MARKER_KEYS.isdisjoint(fields):
            values, packs = stream.decode(fields, cms, bms_packs)
            families = [stream.FAMILY if f == gen3.FAMILY else f for f in families]
        else:
            values, packs = gen3.decode(fields, cms, bms_packs)
    if delta_pro_ultra.FAMILY in families:
        values, packs = delta_pro_ultra.decode(dpu_show, dpu_backend, dpu_packs)
    if powerocean.FAMILY in families:
        values, packs = powerocean.decode(ocean_change, ocean_heartbeat, ocean_packs)
    if panel2.FAMILY in families:
        values, packs = panel2.decode(panel_push, panel_stat)
    if inverter:
        values.update(powerstream.decode(inverter)[0])
    family = families[0] if families else "protobuf"
    raw: dict[str, Any] = {"format": "protobuf", "headers": raw_headers}
    if transport != "binary":
        raw["transport"] = transport
    return Reading(device_sn=device_sn, ts=ts, values=values, raw=raw, family=family,
                   soc_modules=packs)
