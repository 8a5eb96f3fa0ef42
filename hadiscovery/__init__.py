"""Home Assistant MQTT discovery: stations and agents as HA devices, with energy counters."""
