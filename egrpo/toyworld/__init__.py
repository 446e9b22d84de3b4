"""A synthetic text-to-image world (coloured shapes in quadrants) with programmatic rewards, for CPU runs."""
