"""The server process's model machinery: models, pools, supervised workers, routing (no HTTP)."""
