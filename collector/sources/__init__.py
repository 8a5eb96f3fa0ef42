"""Where readings come from; every source hands payloads to the pipeline."""
