"""The dashboards as files: every SQL string they send (panels, variables, annotations)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DASHBOARDS = Path(__file__).resolve().parent.parent / "grafana" / "dashboards"


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def data_panels(dashboard: dict):
    return [p for p in panels(dashboard) if p["type"] != "row"]


@dataclass
class Query:
    """One SQL string from a dashboard and what Grafana needs back from it."""

    dashboard: str
    where: str  # panel title, variable name or annotation name
    kind: str  # "panel", "variable", "annotation"
    sql: str
    format: str
    panel: dict | None = None

    @property
    def id(self) -> str:
        return f"{self.dashboard}:{self.kind}:{self.where}"


def queries() -> list[Query]:
    found = []
    for path in dashboard_files():
        dash = load(path)
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                found.append(Query(path.stem, var["name"], "variable", var["query"], "table"))
        for anno in dash["annotations"]["list"]:
            if "target" in anno:
                found.append(Query(path.stem, anno["name"], "annotation",
                                   anno["target"]["rawSql"], "table"))
        for panel in data_panels(dash):
            for target in panel["targets"]:
                found.append(Query(path.stem, f"{panel['title']}/{target['refId']}", "panel",
                                   target["rawSql"], target["format"], panel))
    return found


