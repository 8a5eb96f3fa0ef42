"""ecoflow-export: a station's readings, outages or daily energy as CSV or Parquet."""
