"""The EcoFlow cloud sources the plan asks for (collector.cloud.plan), sharing one device
directory."""

from __future__ import annotations

import logging

from collector.cloud import state
from collector.cloud.api import app_api, open_api
from collector.cloud.plan import cloud_plan
from collector.settings import CollectorSettings
from collector.sources.app_mqtt import AppMqttSource
from collector.sources.ecoflow_common import DeviceDirectory
from collector.sources.ecoflow_mqtt import OpenMqttSource
from collector.sources.ecoflow_rest import RestSource

log = logging.getLogger(__name__)


def cloud_sources(s: CollectorSettings, db_url: str, pipeline, metrics=None,
                  liveness=None) -> list:
    """The sources, told of `liveness` (collector.sources.liveness): MQTT sources report their
    connection, REST polls a station while its pushes are not fresh (ECOFLOW_REST_POLL)."""
    plan = cloud_plan(s)
    log.info("ecoflow cloud: sources %s, developer API %s, app API %s, stations %s",
             ",".join(plan.sources), plan.open_host, plan.app_host,
             ",".join(plan.serials) or "all on the account")
    api = open_api(s, plan.open_host) if plan.developer else None
    directory = DeviceDirectory(api, plan.serials, metrics)
    sources: list = []
    push_sources = tuple(p for p in ("open_mqtt", "app_mqtt") if p in plan.sources)
    if liveness is not None:
        for name in push_sources:
            liveness.expect(name, s.ecoflow_push_period_sec, plan.serials)
        if "rest" in plan.sources:
            liveness.expect("rest", s.collecting_interval)
    if "rest" in plan.sources:
        sources.append(RestSource(pipeline, api, directory, s.collecting_interval,
                                  liveness=liveness, push_sources=push_sources,
                                  mode=s.ecoflow_rest_poll))
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
    for source in sources:
        if not isinstance(source, RestSource):
            source.liveness = liveness
            source.connack_timeout = s.ecoflow_connack_timeout_sec
            # Look at least twice per expected period (and every 5 s at most).
            source.tick_sec = max(0.2, min(5.0, s.ecoflow_push_period_sec / 2))
    return sources
