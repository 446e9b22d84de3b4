"""Benchmarks that back the project's speed and sample-efficiency claims with reproducible numbers.

`egrpo bench algorithms` (egrpo.bench.algorithms) compares the methods at one budget of transformer
forwards on the toy world; `egrpo bench system` (egrpo.bench.system) measures the runtime: Ray against the
in-process loop, phases, probes, weight sync, the scheduler and memory. They report and never fail on a
number; BENCHMARKS.md holds their results.
"""
