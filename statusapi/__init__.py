"""ecoflow-status-api: read-only station and agent status as JSON and server-sent events."""
