"""Stream (AC, AC Pro, Ultra): balcony batteries with a grid port, over gen-3 protobuf.

Stream sends the gen-3 messages (display upload 254/21, CMS heartbeat 32/2, BMS heartbeat
32/50) with the same battery fields (`cmsBattSoc`, `bmsBattSoc`, `cmsDsgRemTime`), so those
decode as on any gen-3 station (`gen3.battery`). Its powers are different fields:

- PV: `powGetPvSum` (517) over its PV inputs; `powGetPv` (361) is PV input 1 only there, so
  it is never read as the PV total.
- AC: one grid port, `gridConnectionPower` (616) in W, positive while the Stream feeds the
  house (state 619 = 3 FEED_GRID: +108.3 W in foxthefox/ioBroker.ecoflow-mqtt
  test/data2/stream_ultra.json), negative while it draws from the grid (619 = 1 GRID_IN:
  -967.2 W in tolwi/hassio-ecoflow-cloud's Stream sample). One signed figure: the other
  direction is 0 W at that moment.
- Grid: that inflow first (PROTOCOL.md), then the port's voltage `gridConnectionVol` (613, V).

Not decoded (kept raw): the two AC sockets (`powGetSchuko1`/`2`, 1210/1211: whether the grid
port figure includes them is not established), the meter's house powers (`powGetSys*`), and
`powInSumW`/`powOutSumW`, which no Stream capture carries.
"""

from __future__ import annotations

from typing import Any

from . import gen3
from .compiled import Table, rule
from .reading import grid_from, number, watts

FAMILY = "stream"

# Display-upload fields only Stream sends (JSON names): a message with any of them is a Stream.
MARKER_KEYS = frozenset({
    "powGetPvSum", "gridConnectionPower", "gridConnectionVol", "gridConnectionSta",
    "sysGridConnectionPower", "powGetSysGrid", "powGetSysLoad", "powGetBpCms",
    "powGetSysLoadFromPv", "powGetSysLoadFromBp", "powGetSysLoadFromGrid",
    "powGetSchuko1", "powGetSchuko2",
})


def _port(power: Any) -> tuple[int | None, int | None]:
    """(AC in, AC out) watts from the grid port's signed power (negative: drawing in)."""
    w = watts(power)
    if w is None:
        return None, None
    return (-w, 0) if w < 0 else (0, w)


def _grid(f, packs) -> Any:
    return grid_from(number(f("gridConnectionVol")), _port(f("gridConnectionPower"))[0],
                     family=FAMILY)


# The gen-3 battery columns, then the grid port and PV: column order as the decoder has always
# returned them.
TABLE = Table([
    *gen3.BATTERY_RULES,
    rule("ac_in_watts", ["gridConnectionPower"],
         lambda f, packs: _port(f("gridConnectionPower"))[0]),
    rule("ac_out_watts", ["gridConnectionPower"],
         lambda f, packs: _port(f("gridConnectionPower"))[1]),
    rule("pv_in_watts", ["powGetPvSum"], lambda f, packs: watts(f("powGetPvSum"))),
    rule("grid_connected", ["gridConnectionVol", "gridConnectionPower"], _grid),
], gen3._packs, gen3.PACK_KEYS)


def decode(
    fields: dict[str, Any],
    cms: dict[str, Any] | None = None,
    bms_packs: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Columns and per-pack SoCs from a Stream display upload, CMS status and BMS heartbeats
    (TABLE: only the rules the message reaches run)."""
    return TABLE.decode(gen3.with_parts(fields, cms, bms_packs))
