"""Everything Ray: actors, placement, weight sync, the distributed driver loop."""
