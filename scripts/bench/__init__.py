"""The benchmark suites of ``scripts/benchmark.py``: measuring (common), items, one model's suite,
sizes (config), targets, plots and the report."""
