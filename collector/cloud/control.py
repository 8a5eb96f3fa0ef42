"""`ecoflow-collector control`: send one command to a station through the developer API.

Off unless ECOFLOW_ALLOW_CONTROL=true: a collector only reads unless its operator says
otherwise. Meant for load shedding (switching a station's AC output off to stretch runtime).
"""

from __future__ import annotations

import argparse
import json

from collector.cloud.api import EcoflowApiError, ac_output_command, open_api
from collector.cloud.plan import cloud_plan
from collector.decoders.models import model_for
from servicekit.logging import register_secret
from servicekit.settings import SettingsError


def main(argv: list[str]) -> int:
    from collector.settings import collector_settings

    parser = argparse.ArgumentParser(prog="ecoflow-collector control", description=__doc__)
    parser.add_argument("--sn", required=True, help="the station's serial number")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--ac-output", choices=("on", "off"),
                      help="switch the AC outlets (Delta Pro / Max, Delta 2, River 2 families)")
    what.add_argument("--json", help="a raw command object from EcoFlow's documentation "
                      "(without sn), e.g. '{\"params\":{\"cmdSet\":32,\"id\":66,\"enabled\":0}}'")
    parser.add_argument("--model", help="the station's model when its serial number does not "
                        "tell (e.g. 'Delta 2')")
    args = parser.parse_args(argv)
    try:
        s = collector_settings(sources="ecoflow")
        register_secret(s.ecoflow_secret_key)
        plan = cloud_plan(s)
    except SettingsError as exc:
        print(exc)
        return 2
    if not s.ecoflow_allow_control:
        print("refused: sending commands to stations is off; set ECOFLOW_ALLOW_CONTROL=true "
              "to allow it")
        return 3
    if not (s.ecoflow_access_key and s.ecoflow_secret_key):
        print("control needs the developer API: set ECOFLOW_ACCESS_KEY and ECOFLOW_SECRET_KEY")
        return 2
    try:
        if args.json:
            command = json.loads(args.json)
            if not isinstance(command, dict):
                raise ValueError("the command must be a JSON object")
        else:
            command = ac_output_command(args.model or model_for(args.sn), args.ac_output == "on")
    except ValueError as exc:
        print(f"--json / --model: {exc}")
        return 2
    print(f"sending to {args.sn}: {json.dumps(command, separators=(',', ':'))}")
    try:
        open_api(s, plan.open_host).set_quota(args.sn, command, allow_control=True)
    except EcoflowApiError as exc:
        print(f"failed: {exc}")
        return 1
    print("accepted by EcoFlow")
    return 0
