"""Initial schema: readings hypertable, topology, audit, commands, agents, ingest errors, views.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from alembic import op
from sqlalchemy import text

from servicekit import dbsetup
from servicekit.settings import database_settings

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SOURCES = ("rest", "open_mqtt", "app_mqtt", "bridge", "nut", "simulator")

# Readings further apart than this are a gap in the data, not a period of steady power: energy
# integration (outages, energy_daily) counts nothing across such a gap.
MAX_INTEGRATION_GAP_SEC = 900

TABLES = """
CREATE TABLE ecoflow_measurements (
    ts               timestamptz NOT NULL,
    device_sn        text        NOT NULL,
    soc_percent      real,
    soc_min_percent  real,
    remain_time_min  integer,
    watts_in_sum     integer,
    watts_out_sum    integer,
    ac_in_watts      integer,
    ac_out_watts     integer,
    dc_out_watts     integer,
    typec_out_watts  integer,
    usb_out_watts    integer,
    pv_in_watts      integer,
    grid_connected   boolean,
    battery_temp_c   real,
    source           text        NOT NULL
        CONSTRAINT ecoflow_measurements_source_check CHECK (source IN ({sources})),
    raw_data         jsonb       NOT NULL
);
COMMENT ON TABLE ecoflow_measurements IS
    'Every reading of every station: decoded columns (a complete snapshot) plus the raw payload';
COMMENT ON COLUMN ecoflow_measurements.soc_min_percent IS
    'Lowest SoC across battery modules: the value shutdown decisions use';
COMMENT ON COLUMN ecoflow_measurements.grid_connected IS
    'AC input present; null when the payload cannot tell';

-- One index serves both "latest reading per device" and "one device over a time range";
-- it is also the uniqueness that makes ingestion idempotent (ON CONFLICT DO NOTHING).
CREATE UNIQUE INDEX ecoflow_measurements_device_ts_key ON ecoflow_measurements (device_sn, ts DESC);
CREATE INDEX ecoflow_measurements_ts_idx ON ecoflow_measurements (ts DESC);

CREATE TABLE devices (
    device_sn       text PRIMARY KEY,
    name            text UNIQUE,
    model           text,
    site            text,
    capacity_wh     real CHECK (capacity_wh > 0),
    stale_after_sec integer NOT NULL DEFAULT 120 CHECK (stale_after_sec > 0),
    dead_after_sec  integer NOT NULL DEFAULT 600,
    first_seen      timestamptz,
    last_seen       timestamptz,
    cloud_online    boolean,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT devices_dead_after_stale CHECK (dead_after_sec >= stale_after_sec)
);
COMMENT ON COLUMN devices.cloud_online IS 'Online flag from the EcoFlow device list, when known';

CREATE TABLE agents (
    agent_id              text PRIMARY KEY CHECK (agent_id ~ '^[A-Za-z0-9_.-]{{1,64}}$'),
    name                  text,
    tier                  integer NOT NULL DEFAULT 0,
    min_supplies          integer CHECK (min_supplies >= 1),
    soc_threshold         real CHECK (soc_threshold >= 0 AND soc_threshold < 100),
    runtime_threshold_min integer CHECK (runtime_threshold_min >= 0),
    shutdown_delay_sec    integer CHECK (shutdown_delay_sec >= 0),
    enabled               boolean NOT NULL DEFAULT true,
    updated_at            timestamptz NOT NULL DEFAULT now()
);
COMMENT ON COLUMN agents.min_supplies IS
    'Healthy supplies the host needs; null means all of its supplies';

-- The power topology: which stations supply which hosts.
CREATE TABLE agent_supplies (
    agent_id  text NOT NULL REFERENCES agents ON DELETE CASCADE,
    device_sn text NOT NULL REFERENCES devices ON DELETE CASCADE,
    PRIMARY KEY (agent_id, device_sn)
);
CREATE INDEX agent_supplies_device_idx ON agent_supplies (device_sn);

CREATE TABLE policy_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts         timestamptz NOT NULL DEFAULT now(),
    kind       text NOT NULL,
    device_sn  text,
    agent_id   text,
    episode_id text,
    command_id uuid,
    trigger    text,
    message    text,
    details    jsonb NOT NULL DEFAULT '{{}}'::jsonb
);
CREATE INDEX policy_events_ts_idx ON policy_events (ts DESC);
CREATE INDEX policy_events_episode_idx ON policy_events (episode_id, ts);

CREATE TABLE commands (
    id             uuid PRIMARY KEY,
    agent_id       text NOT NULL,
    action         text NOT NULL CHECK (action IN ('shutdown', 'abort', 'test')),
    episode_id     text,
    cancels_id     uuid REFERENCES commands (id),
    reason         text,
    delay_sec      integer NOT NULL DEFAULT 0 CHECK (delay_sec >= 0),
    ttl_sec        integer NOT NULL CHECK (ttl_sec > 0),
    issued_at      timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    payload        jsonb NOT NULL,
    status         text NOT NULL DEFAULT 'pending' CHECK (status IN (
                       'pending', 'sent', 'received', 'scheduled', 'executing', 'aborted',
                       'rejected', 'expired', 'dry_run')),
    send_count     integer NOT NULL DEFAULT 0,
    first_sent_at  timestamptz,
    last_sent_at   timestamptz,
    acked_at       timestamptz,
    ack_status     text,
    ack_host       text,
    ack_detail     text,
    CONSTRAINT commands_expiry_after_issue CHECK (expires_at > issued_at)
);
-- At most one shutdown per agent per outage episode, whatever the worker does.
CREATE UNIQUE INDEX commands_one_shutdown_per_episode
    ON commands (agent_id, episode_id) WHERE action = 'shutdown' AND episode_id IS NOT NULL;
CREATE INDEX commands_agent_issued_idx ON commands (agent_id, issued_at DESC);

-- Every acknowledgement as received; commands.ack_* holds the latest.
CREATE TABLE command_acks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_id  uuid NOT NULL,
    agent_id    text NOT NULL,
    status      text NOT NULL,
    host        text,
    agent_ts    timestamptz,
    received_at timestamptz NOT NULL DEFAULT now(),
    detail      text,
    payload     jsonb
);
CREATE INDEX command_acks_command_idx ON command_acks (command_id, received_at);

CREATE TABLE agent_status (
    agent_id   text PRIMARY KEY,
    online     boolean NOT NULL,
    last_seen  timestamptz NOT NULL DEFAULT now(),
    changed_at timestamptz NOT NULL DEFAULT now(),
    version    text,
    platform   text,
    host       text,
    payload    jsonb
);

CREATE TABLE ingest_errors (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts        timestamptz NOT NULL DEFAULT now(),
    source    text NOT NULL,
    topic     text,
    device_sn text,
    payload   bytea NOT NULL,
    error     text NOT NULL
);
CREATE INDEX ingest_errors_ts_idx ON ingest_errors (ts DESC);
""".format(sources=", ".join(f"'{s}'" for s in SOURCES))

VIEWS = f"""
-- One row per device: its latest reading, how old it is, and whether it counts as online.
-- The device list comes from a loose index scan, so the view stays fast on a long history.
CREATE VIEW ecoflow_latest AS
WITH RECURSIVE sns AS (
    (SELECT device_sn FROM ecoflow_measurements ORDER BY device_sn LIMIT 1)
    UNION ALL
    SELECT (SELECT m.device_sn FROM ecoflow_measurements m
             WHERE m.device_sn > sns.device_sn ORDER BY m.device_sn LIMIT 1)
      FROM sns WHERE sns.device_sn IS NOT NULL
)
SELECT l.device_sn,
       coalesce(d.name, l.device_sn)                      AS device_name,
       d.model,
       l.ts,
       l.soc_percent, l.soc_min_percent, l.remain_time_min,
       l.watts_in_sum, l.watts_out_sum,
       l.ac_in_watts, l.ac_out_watts, l.dc_out_watts, l.typec_out_watts, l.usb_out_watts,
       l.pv_in_watts, l.grid_connected, l.battery_temp_c, l.source,
       extract(epoch FROM now() - l.ts)::double precision AS age_sec,
       (now() - l.ts) <= make_interval(secs => coalesce(d.stale_after_sec, 120)) AS online,
       l.raw_data
  FROM sns
  CROSS JOIN LATERAL (
        SELECT * FROM ecoflow_measurements m
         WHERE m.device_sn = sns.device_sn ORDER BY m.ts DESC LIMIT 1) l
  LEFT JOIN devices d ON d.device_sn = l.device_sn
 WHERE sns.device_sn IS NOT NULL;

-- Grid-loss episodes: runs of readings with grid_connected = false. An episode ends at the
-- first reading with the grid back (null while ongoing). Energy is power integrated over time.
CREATE VIEW outages AS
WITH r AS (
    SELECT device_sn, ts, grid_connected, soc_percent, soc_min_percent, watts_out_sum,
           lag(grid_connected) OVER w AS prev_grid,
           lead(ts) OVER w            AS next_ts
      FROM ecoflow_measurements
     WHERE grid_connected IS NOT NULL
    WINDOW w AS (PARTITION BY device_sn ORDER BY ts)
), numbered AS (
    SELECT *, count(*) FILTER (WHERE prev_grid IS DISTINCT FROM grid_connected)
                  OVER (PARTITION BY device_sn ORDER BY ts) AS run_no
      FROM r
), episodes AS (
    SELECT device_sn,
           min(ts)                                              AS started_at,
           (array_agg(next_ts ORDER BY ts DESC))[1]             AS ended_at,
           (array_agg(soc_percent ORDER BY ts))[1]              AS soc_start_percent,
           (array_agg(soc_percent ORDER BY ts DESC))[1]         AS soc_end_percent,
           min(soc_min_percent)                                 AS soc_min_percent,
           sum(watts_out_sum * CASE
                   WHEN extract(epoch FROM next_ts - ts) <= {MAX_INTEGRATION_GAP_SEC}
                   THEN extract(epoch FROM next_ts - ts) ELSE 0 END) / 3600.0 AS energy_out_wh,
           count(*)                                             AS readings
      FROM numbered
     WHERE NOT grid_connected
     GROUP BY device_sn, run_no
)
SELECT device_sn, started_at, ended_at,
       ended_at IS NULL                                             AS ongoing,
       coalesce(ended_at, now()) - started_at                       AS duration,
       extract(epoch FROM coalesce(ended_at, now()) - started_at)::double precision AS duration_sec,
       soc_start_percent, soc_end_percent, soc_min_percent,
       coalesce(energy_out_wh, 0)::double precision                 AS energy_out_wh,
       readings
  FROM episodes;

-- Energy per device and day (in the session's time zone): power integrated over the time to
-- the next reading, so irregular sampling does not skew the totals.
CREATE VIEW energy_daily AS
WITH r AS (
    SELECT device_sn, ts, watts_in_sum, watts_out_sum, pv_in_watts,
           extract(epoch FROM lead(ts) OVER (PARTITION BY device_sn ORDER BY ts) - ts) AS dt
      FROM ecoflow_measurements
)
SELECT device_sn,
       date_trunc('day', ts)                                             AS day,
       (sum(watts_in_sum * dt) / 3600.0)::double precision             AS wh_in,
       (sum(watts_out_sum * dt) / 3600.0)::double precision            AS wh_out,
       (sum(pv_in_watts * dt) / 3600.0)::double precision              AS wh_solar,
       count(*)                                                          AS readings
  FROM r
 WHERE dt <= {MAX_INTEGRATION_GAP_SEC}
 GROUP BY device_sn, date_trunc('day', ts);
"""

ROLLUP_COLUMNS = """
       device_sn,
       avg(soc_percent)      AS soc_avg,
       min(soc_min_percent)  AS soc_min,
       max(soc_percent)      AS soc_max,
       avg(watts_in_sum)     AS watts_in_avg,
       max(watts_in_sum)     AS watts_in_max,
       avg(watts_out_sum)    AS watts_out_avg,
       max(watts_out_sum)    AS watts_out_max,
       avg(ac_in_watts)      AS ac_in_avg,
       avg(ac_out_watts)     AS ac_out_avg,
       avg(pv_in_watts)      AS pv_in_avg,
       count(*)              AS readings
  FROM ecoflow_measurements
"""

ROLLUPS = {
    # name: (bucket, refresh start_offset, end_offset, schedule_interval)
    "ecoflow_rollup_1m": ("1 minute", "2 hours", "1 minute", "1 minute"),
    "ecoflow_rollup_1h": ("1 hour", "3 days", "1 hour", "30 minutes"),
}


def _settings():
    attrs = op.get_context().config.attributes if op.get_context().config else {}
    return attrs.get("settings") or database_settings()


def upgrade() -> None:
    conn = op.get_bind()
    flavour = dbsetup.ensure_timescaledb(conn)
    op.execute(TABLES)
    if flavour.timescaledb:
        conn.execute(
            text(
                "SELECT create_hypertable('ecoflow_measurements', 'ts',"
                " chunk_time_interval => INTERVAL '1 day', create_default_indexes => false)"
            )
        )
    op.execute(VIEWS)

    if flavour.community:
        op.execute(
            "ALTER TABLE ecoflow_measurements SET (timescaledb.compress,"
            " timescaledb.compress_segmentby = 'device_sn', timescaledb.compress_orderby = 'ts DESC')"
        )
        op.execute("SELECT add_compression_policy('ecoflow_measurements', INTERVAL '7 days')")
        # Continuous aggregates cannot be created inside a transaction.
        with op.get_context().autocommit_block():
            for name, (bucket, start, end, every) in ROLLUPS.items():
                op.execute(
                    f"CREATE MATERIALIZED VIEW {name}"
                    " WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS"
                    f" SELECT time_bucket(INTERVAL '{bucket}', ts) AS bucket, {ROLLUP_COLUMNS}"
                    " GROUP BY 1, device_sn WITH NO DATA"
                )
                op.execute(
                    f"SELECT add_continuous_aggregate_policy('{name}',"
                    f" start_offset => INTERVAL '{start}', end_offset => INTERVAL '{end}',"
                    f" schedule_interval => INTERVAL '{every}')"
                )
    else:
        for name, (bucket, *_policy) in ROLLUPS.items():
            op.execute(
                f"CREATE VIEW {name} AS"
                f" SELECT date_bin(INTERVAL '{bucket}', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00')"
                f" AS bucket, {ROLLUP_COLUMNS} GROUP BY 1, device_sn"
            )

    settings = _settings()
    if flavour.community:
        dbsetup.apply_retention_policy(conn, settings.retention_days)
    dbsetup.ensure_readonly_role(conn, settings.readonly_user, settings.readonly_password)


def downgrade() -> None:
    conn = op.get_bind()
    dbsetup.revoke_readonly_role(conn, _settings().readonly_user)
    flavour = dbsetup.flavour(conn)
    caggs = set()
    if flavour.timescaledb:
        caggs = set(
            conn.execute(
                text("SELECT view_name FROM timescaledb_information.continuous_aggregates")
            ).scalars()
        )
    for name in ROLLUPS:
        kind = "MATERIALIZED VIEW" if name in caggs else "VIEW"
        op.execute(f"DROP {kind} IF EXISTS {name}")
    op.execute("DROP VIEW IF EXISTS energy_daily, outages, ecoflow_latest")
    op.execute(
        "DROP TABLE IF EXISTS ingest_errors, agent_status, command_acks, commands, policy_events,"
        " agent_supplies, agents, devices"
    )
    # TimescaleDB drops a hypertable only on its own.
    op.execute("DROP TABLE IF EXISTS ecoflow_measurements")
