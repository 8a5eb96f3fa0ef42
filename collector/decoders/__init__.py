"""Payload decoders: turn one EcoFlow payload (JSON or gen-3 protobuf) into readings.

Entry point: `decode(payload, topic=None, source=None) -> list[Reading]`, raising `DecodeError`
(with the reason) for anything undecodable. The registry picks the decoder from the payload's
shape (JSON envelope, protobuf HeaderMessage, base64 text) and its keys; the topic supplies the
serial number, which wins over one found in the payload.

One payload gives one Reading today. A protobuf payload with several headers (a Delta 3 Plus
reply carries four) is merged into that one Reading, later headers winning on overlap, because
the headers describe the same station at the same moment. The list return type leaves room for
payloads that describe several stations.

`Reading.values` holds only the columns the payload determines: EcoFlow messages are
incremental, so the collector merges them into the device's last known snapshot. A column
present with None is cleared (a "not applicable" sentinel such as a remaining time of 5999):
the collector stores NULL for it until a real value arrives. soc_min_percent is the lowest
pack in the payload, or the headline SoC marked `collector.rows.HeadlineSoc`, which the
snapshot merge replaces by the lowest pack it knows (collector.rows.SnapshotMerger).

Families, one module each: `delta_gen1` (Delta Pro, Delta Max), `river_gen1` (River, River Pro,
River Max), `delta_gen2` (Delta 2 / 2 Max, River 2 family), `gen3` (River 3, Delta 3, Delta Pro
3: protobuf and Delta Pro 3 REST), `stream` (Stream AC / AC Pro / Ultra), `delta_pro_ultra`,
`panel2` (Smart Home Panel 2), `powerocean`, `powerstream`, `smartplug`.
"""

from .reading import COLUMNS, DecodeError, Reading
from .registry import decode, decode_json, sn_from_topic

__all__ = ["COLUMNS", "DecodeError", "Reading", "decode", "decode_json", "sn_from_topic"]
