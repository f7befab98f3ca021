"""Building emulated networks: names and cleanup, Mininet nodes and links, routing, capture."""
