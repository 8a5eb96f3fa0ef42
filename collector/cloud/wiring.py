"""Build the cloud sources the plan asks for, sharing one device directory."""

from __future__ import annotations

import logging

from collector.cloud import state
from collector.cloud.api import AppApi, OpenApi
from collector.cloud.plan import cloud_plan
from collector.cloud.sources import AppMqttSource, DeviceDirectory, OpenMqttSource, RestSource
from collector.settings import CollectorSettings

log = logging.getLogger(__name__)


def open_api(s: CollectorSettings, host: str) -> OpenApi:
    return OpenApi(host, s.ecoflow_access_key or "", s.ecoflow_secret_key or "",
                   ca_file=s.ecoflow_tls_ca)


def app_api(s: CollectorSettings, host: str) -> AppApi:
    return AppApi(host, s.ecoflow_account_user or "", s.ecoflow_account_password or "",
                  ca_file=s.ecoflow_tls_ca)


def cloud_sources(s: CollectorSettings, db_url: str, pipeline, metrics=None) -> list:
    plan = cloud_plan(s)
    log.info("ecoflow cloud: sources %s, developer API %s, app API %s, stations %s",
             ",".join(plan.sources), plan.open_host, plan.app_host,
             ",".join(plan.serials) or "all on the account")
    api = open_api(s, plan.open_host) if plan.developer else None
    directory = DeviceDirectory(api, plan.serials, metrics)
    sources: list = []
    if "rest" in plan.sources:
        sources.append(RestSource(pipeline, api, directory, s.collecting_interval))
    if "open_mqtt" in plan.sources:
        def open_id() -> str:
            return s.ecoflow_mqtt_client_id or state.get_or_create(
                db_url, state.account_key("open", s.ecoflow_access_key), state.open_client_id)

        sources.append(OpenMqttSource(pipeline, api, directory, open_id, s.ecoflow_tls_ca))
    if "app_mqtt" in plan.sources:
        app = app_api(s, plan.app_host)

        def app_id() -> str:
            # The app's own id shape; ECOFLOW_MQTT_CLIENT_ID is for the developer broker only
            # (both brokers may be one, and one id on two connections would evict each other).
            return state.get_or_create(
                db_url, state.account_key("app", s.ecoflow_account_user),
                lambda: state.app_client_id(app.user_id or app.login()))

        sources.append(AppMqttSource(pipeline, app, directory, app_id, s.ecoflow_tls_ca,
                                     s.ecoflow_latest_quotas_sec))
    return sources
