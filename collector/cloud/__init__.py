"""EcoFlow's cloud: the developer ("open") REST API and MQTT broker, and the app-login MQTT.

`signing` signs developer API requests, `api` talks to the REST endpoints and turns EcoFlow's
error codes into advice, `sources` feeds the collector's pipeline from REST polling and the two
MQTT flavours, `doctor` checks an installation's credentials end to end.
"""
