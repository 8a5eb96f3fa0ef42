"""EcoFlow's cloud as a client talks to it: the developer ("open") REST API, the app login, and
their MQTT brokers. The sources that feed the pipeline from it live with every other source in
`collector.sources` (`ecoflow_rest`, `ecoflow_mqtt`, `app_mqtt`, built by `ecoflow`).

`signing` signs developer API requests, `api` talks to the REST endpoints and turns EcoFlow's
error codes into advice, `broker` makes the TLS MQTT client, `plan` picks the sources from the
credentials present, `state` keeps the stable client ids, `doctor` checks an installation's
credentials end to end, `control` sends one opt-in command.
"""
