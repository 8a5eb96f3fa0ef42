"""`python -m collector` (or `ecoflow-collector`): run the collector, decode one payload, run
the station simulator, check the EcoFlow credentials (`doctor`), or switch a station's AC output
through the developer API (`control`, opt-in)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "decode":
        from collector.decode_cli import main as decode_main

        return decode_main(argv[1:])
    if argv and argv[0] == "simulate":
        return simulate(argv[1:])
    if argv and argv[0] == "doctor":
        from collector.cloud.doctor import main as doctor_main

        return doctor_main(argv[1:])
    if argv and argv[0] == "control":
        from collector.cloud.control import main as control_main

        return control_main(argv[1:])
    if argv and argv[0] == "status":
        from collector.sources.liveness import status_main

        return status_main(argv[1:])
    if argv and argv[0] not in ("run",):
        print("usage: python -m collector [run | decode [--topic T] FILE | simulate ... | doctor"
              " | control ... | status];"
              f" unknown {argv[0]!r}", file=sys.stderr)
        return 2
    from collector.service import Collector
    from collector.settings import collector_settings
    from servicekit import logging as logsetup
    from servicekit.settings import database_settings

    logsetup.setup()
    Collector(collector_settings(), database_settings()).run_forever()
    return 0


def simulate(argv: list[str]) -> int:
    """Publish simulated stations to the broker in MQTT_HOST / MQTT_PORT until interrupted."""
    import argparse
    import signal
    import threading

    from collector.settings import collector_settings
    from collector.sources.simulator import SCENARIOS, Simulator, default_stations
    from servicekit import logging as logsetup

    logsetup.setup()
    s = collector_settings()
    parser = argparse.ArgumentParser(prog="python -m collector simulate",
                                     description="Defaults come from SIMULATOR_SCENARIO,"
                                     " SIMULATOR_ACCEL and SIMULATOR_INTERVAL_SEC.")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default=s.simulator_scenario)
    parser.add_argument("--accel", type=float, default=s.simulator_accel,
                        help="run the stations' physics this many times faster than real time")
    parser.add_argument("--interval", type=float, default=s.simulator_interval_sec,
                        help="seconds between payloads of one station")
    args = parser.parse_args(argv)
    sim = Simulator(default_stations(args.scenario), s.mqtt_host, s.mqtt_port, args.interval,
                    args.accel, s.mqtt_user, s.mqtt_pass)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sim.start()
    stop.wait()
    sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
