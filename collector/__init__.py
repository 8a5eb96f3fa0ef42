"""Collector: reads EcoFlow stations from their sources, decodes payloads, stores readings."""
