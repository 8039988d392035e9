"""Benchmarks: ``fedprint bench matcher`` measures the matching engine (throughput against
gallery size and batch size, exhaustive against shortlist, the device's product roofline).

Entry point: :func:`bench.matcher.run_matcher_bench` with a :class:`bench.matcher.MatcherBenchConfig`.
"""
