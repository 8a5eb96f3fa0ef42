"""Simulator source: stations of different families publishing in their native formats.

Each simulated station runs a small energy model (battery, load, solar, grid charger) through a
scripted scenario and publishes what a real one would: app-MQTT JSON for a Delta 2, gen-1 JSON
with an extra battery for a Delta Max, and XOR-obfuscated gen-3 protobuf for a River 3. Time
acceleration speeds up the physics (SoC moves `accel` times faster), while timestamps stay real
so that freshness checks downstream behave as in production.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

from collector.proto import ecoflow_pb2 as pb
from servicekit.mqtt import make_client

log = logging.getLogger(__name__)


@dataclass
class Phase:
    """A stretch of a scenario: lasts `seconds` of simulated time, or until SoC reaches
    `until_soc` while discharging."""

    grid: bool
    load_w: float
    pv_w: float = 0.0
    seconds: float | None = None
    until_soc: float | None = None


SCENARIOS: dict[str, list[Phase]] = {
    "steady": [Phase(grid=True, load_w=150, seconds=None)],
    "solar": [Phase(grid=False, load_w=120, pv_w=400, seconds=None)],
    # Grid lost, the battery runs down to a low SoC, the grid comes back and recharges.
    "outage": [
        Phase(grid=True, load_w=300, seconds=300),
        Phase(grid=False, load_w=300, until_soc=8),
        Phase(grid=False, load_w=300, seconds=600),
        Phase(grid=True, load_w=300, seconds=None),
    ],
    "grid_return": [Phase(grid=False, load_w=200, seconds=600), Phase(grid=True, load_w=200)],
}


@dataclass
class Station:
    sn: str
    family: str  # "delta2", "deltamax" or "river3"
    capacity_wh: float
    soc: float = 100.0
    charge_w: float = 500.0
    scenario: list[Phase] = field(default_factory=lambda: SCENARIOS["steady"])
    phase_index: int = 0
    phase_elapsed: float = 0.0
    seq: int = 0
    extra_battery_offset: float = 2.5  # Delta Max: the extra pack runs a little lower

    @property
    def phase(self) -> Phase:
        return self.scenario[self.phase_index]

    def step(self, dt: float) -> None:
        """Advance the energy model by dt simulated seconds."""
        p = self.phase
        charge = self.charge_w if p.grid and self.soc < 100 else 0.0
        net_w = p.pv_w + charge - (0 if p.grid else p.load_w)
        self.soc = max(0.0, min(100.0, self.soc + net_w * dt / 3600 / self.capacity_wh * 100))
        self.phase_elapsed += dt
        done = (p.seconds is not None and self.phase_elapsed >= p.seconds) or (
            p.until_soc is not None and self.soc <= p.until_soc)
        if done and self.phase_index + 1 < len(self.scenario):
            self.phase_index += 1
            self.phase_elapsed = 0.0

    @property
    def watts(self) -> tuple[int, int, int, int]:
        """(input, output, ac_in, pv) in W."""
        p = self.phase
        charge = self.charge_w if p.grid and self.soc < 100 else 0.0
        ac_in = (p.load_w + charge) if p.grid else 0.0
        return round(ac_in + p.pv_w), round(p.load_w), round(ac_in), round(p.pv_w)

    def remain_min(self) -> int | None:
        if self.phase.grid or self.phase.load_w <= self.phase.pv_w:
            return None
        return round(self.soc / 100 * self.capacity_wh / (self.phase.load_w - self.phase.pv_w) * 60)

    def payload(self) -> bytes:
        self.seq += 1
        return {"delta2": self._delta2, "deltamax": self._deltamax,
                "river3": self._river3}[self.family]()

    # -- native formats -----------------------------------------------------------------------
    def _delta2(self) -> bytes:
        w_in, w_out, ac_in, pv = self.watts
        remain = self.remain_min()
        params = {
            "bms_emsStatus.f32LcdShowSoc": round(self.soc, 1),
            "bms_bmsStatus.soc": round(self.soc),
            "bms_bmsStatus.temp": 25,
            "bms_emsStatus.dsgRemainTime": remain if remain is not None else 5999,
            "pd.wattsInSum": w_in, "pd.wattsOutSum": w_out,
            "inv.inputWatts": ac_in, "inv.outputWatts": w_out,
            "inv.acInVol": 230000 if self.phase.grid else 0,
            "mppt.inWatts": pv,
        }
        return json.dumps({"id": self.seq, "version": "1.0",
                           "timestamp": int(time.time() * 1000), "params": params}).encode()

    def _deltamax(self) -> bytes:
        w_in, w_out, ac_in, pv = self.watts
        remain = self.remain_min()
        slave = max(0.0, self.soc - self.extra_battery_offset)
        params = {
            "ems.f32LcdShowSoc": round((self.soc + slave) / 2, 1),
            "bmsMaster.soc": round(self.soc), "bmsMaster.temp": 27,
            "bmsSlave1.soc": round(slave),
            "ems.dsgRemainTime": remain if remain is not None else 5999,
            "pd.wattsInSum": w_in, "pd.wattsOutSum": w_out,
            "inv.inputWatts": ac_in, "inv.outputWatts": w_out,
            "inv.acInVol": 230000 if self.phase.grid else 0,
            "mppt.inWatts": pv * 10,  # Delta Max reports solar in 0.1 W
        }
        return json.dumps({"id": self.seq, "version": "1.0",
                           "timestamp": int(time.time() * 1000), "params": params}).encode()

    def _river3(self) -> bytes:
        w_in, w_out, ac_in, pv = self.watts
        remain = self.remain_min()
        display = pb.DisplayPropertyUpload(
            pow_in_sum_w=w_in, pow_out_sum_w=w_out, pow_get_ac_in=ac_in,
            pow_get_ac_out=-float(w_out), pow_get_pv=pv, cms_batt_soc=round(self.soc, 1),
            cms_dsg_rem_time=remain if remain is not None else 5999,
            plug_in_info_ac_in_flag=1 if self.phase.grid else 0,
        )
        pdata = display.SerializeToString()
        key = self.seq & 0xFF
        header = pb.Header(
            pdata=bytes(b ^ key for b in pdata), src=2, dest=32, enc_type=1, cmd_func=254,
            cmd_id=21, data_len=len(pdata), seq=self.seq, device_sn=self.sn,
        )
        return pb.HeaderMessage(header=[header]).SerializeToString()


def default_stations(scenario: str = "outage") -> list[Station]:
    phases = SCENARIOS[scenario]
    return [
        Station("DAEBZ5ZE4000123", "deltamax", capacity_wh=2016, soc=85, scenario=phases),
        Station("R351ZFB4HF123456", "delta2", capacity_wh=1024, soc=90, scenario=phases),
        Station("R631ZEB4WH123456", "river3", capacity_wh=245, soc=95, scenario=phases),
    ]


class Simulator:
    """Publishes every station's payload every `interval` real seconds on
    bridge-ecoflow/<sn>/data, with the physics `accel` times faster than real time."""

    def __init__(self, stations: list[Station], host: str, port: int, interval: float = 1.0,
                 accel: float = 1.0, user: str | None = None, password: str | None = None,
                 client_id: str = "ecoflow-simulator"):
        self.stations = stations
        self.interval = interval
        self.accel = accel
        self.client = make_client(client_id, user, password)
        self.host, self.port = host, port
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.published = 0

    def start(self) -> None:
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="simulator", daemon=True)
        self._thread.start()

    def tick(self) -> None:
        """Advance every station by one interval and publish its payload."""
        for st in self.stations:
            st.step(self.interval * self.accel)
            self.client.publish(f"bridge-ecoflow/{st.sn}/data", st.payload(), qos=1,
                                properties=_simulator_properties())
            self.published += 1

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.tick()
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self.client.disconnect()
        self.client.loop_stop()


def _simulator_properties():
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("source", "simulator")
    return props
