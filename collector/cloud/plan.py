"""Which EcoFlow cloud sources to run, decided from the credentials present.

- Developer keys (ECOFLOW_ACCESS_KEY + ECOFLOW_SECRET_KEY): `open_mqtt` (live pushes) and
  `rest` (the device list with EcoFlow's online flag, and `quota/all` every COLLECTING_INTERVAL
  for each station whose pushes are not fresh: the failover of docs/ecoflow-cloud-liveness.md;
  ECOFLOW_REST_POLL=always polls every station regardless).
- App login (ECOFLOW_ACCOUNT_USER + ECOFLOW_ACCOUNT_PASSWORD): `app_mqtt`.
- ECOFLOW_SOURCES overrides the choice; it must not ask for a source whose credentials are
  missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from servicekit.settings import SettingsError

if TYPE_CHECKING:  # collector.settings imports this module: no import back at run time
    from collector.settings import CollectorSettings

DEFAULT_OPEN_HOST = "api-e.ecoflow.com"
DEFAULT_APP_HOST = "api.ecoflow.com"

DEVELOPER_HELP = ("ECOFLOW_ACCESS_KEY and ECOFLOW_SECRET_KEY (developer API keys: "
                  "https://developer-eu.ecoflow.com, Security)")
APP_HELP = ("ECOFLOW_ACCOUNT_USER and ECOFLOW_ACCOUNT_PASSWORD (the e-mail and password of "
            "the EcoFlow app)")


@dataclass(frozen=True)
class CloudPlan:
    sources: tuple[str, ...]
    open_host: str
    app_host: str
    serials: tuple[str, ...]  # empty: every device on the account

    @property
    def developer(self) -> bool:
        return bool({"rest", "open_mqtt"} & set(self.sources))


def cloud_plan(s: CollectorSettings) -> CloudPlan:
    """The sources to run, or SettingsError naming the variables to fix."""
    problems: list[str] = []
    has_ak, has_sk = bool(s.ecoflow_access_key), bool(s.ecoflow_secret_key)
    has_user, has_pw = bool(s.ecoflow_account_user), bool(s.ecoflow_account_password)
    if has_ak != has_sk:
        missing = "ECOFLOW_SECRET_KEY" if has_ak else "ECOFLOW_ACCESS_KEY"
        problems.append(f"{missing}: missing; the developer API needs both keys of a pair")
    if has_user != has_pw:
        missing = "ECOFLOW_ACCOUNT_PASSWORD" if has_user else "ECOFLOW_ACCOUNT_USER"
        problems.append(f"{missing}: missing; the app login needs the e-mail and the password")
    developer, app = has_ak and has_sk, has_user and has_pw

    if s.ecoflow_sources == "auto":
        sources = (["open_mqtt", "rest"] if developer else []) + (["app_mqtt"] if app else [])
        if not sources and not problems:
            problems.append(f"COLLECTOR_SOURCES includes ecoflow but no EcoFlow credentials are "
                            f"set: give {DEVELOPER_HELP}, or {APP_HELP}")
    else:
        sources = s.ecoflow_sources.split(",")
        if {"rest", "open_mqtt"} & set(sources) and not developer and not problems:
            problems.append(f"ECOFLOW_SOURCES: {s.ecoflow_sources} needs {DEVELOPER_HELP}")
        if "app_mqtt" in sources and not app and not problems:
            problems.append(f"ECOFLOW_SOURCES: {s.ecoflow_sources} needs {APP_HELP}")

    serials = tuple(s.device_serials)
    if "app_mqtt" in sources and not serials and not developer:
        problems.append("ECOFLOW_DEVICE_LIST: the app login cannot list the account's stations; "
                        "name them (comma-separated serial numbers, as in the EcoFlow app), or "
                        f"add {DEVELOPER_HELP} so the device list comes from the developer API")
    if problems:
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(problems))
    return CloudPlan(
        sources=tuple(sorted(sources)),
        open_host=s.ecoflow_api_host or DEFAULT_OPEN_HOST,
        # The earlier exporters used ECOFLOW_API_HOST for the app login too: honour that when
        # the app login is the only credential.
        app_host=s.ecoflow_app_api_host or (s.ecoflow_api_host if not developer else None)
        or DEFAULT_APP_HOST,
        serials=serials,
    )
