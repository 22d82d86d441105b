"""The pairs-scaling row of scripts/benchmark.py: sizes, per-n ratios and verdicts (no timing here)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench import pairs  # noqa: E402


def _row(n: int, rss: float, spp: float, rc: int = 0) -> dict:
    return {"n": n, "peak_rss_gib": rss, "seconds_per_pair": spp, "returncode": rc, "load1": 1.0,
            "command": "featcircuits discover --n N --out DIR"}


def test_sizes_and_commands():
    assert pairs.parse_sizes("full") == [64, 128, 256, 512, 1024, 2048]
    assert pairs.parse_sizes("256,64,64") == [64, 256]
    with pytest.raises(SystemExit):
        pairs.parse_sizes("0,64")
    for cmd in pairs.COMMANDS:
        argv = pairs.command_argv(cmd, 512, "starter", 16)
        assert argv[0] == cmd and "512" in argv and "--out" not in argv
    curves = pairs.command_argv("curves", 512, "starter", 16)
    assert curves[curves.index("--n-eval") + 1] == "512"  # evaluation grows with n too


def test_ratios_take_the_worst_n_against_the_smallest():
    rows = [_row(64, 2.0, 0.5), _row(128, 3.2, 0.55), _row(256, 2.4, 0.7), _row(512, 9.0, 0.1, rc=1)]
    r = pairs.ratios(rows)
    assert r["peak_rss_ratio"] == 1.6 and r["time_per_pair_ratio"] == 1.4  # n=128's RSS, n=256's time; failed run out
    assert not r["peak_rss_within_target"] and not r["time_per_pair_within_target"]
    assert rows[1]["peak_rss_vs_smallest"] == 1.6 and "peak_rss_vs_smallest" not in rows[3]
    text = pairs.pairs_section({"pairs_scaling": {"command": "discover", "rows": rows, "batch_size": 16,
                                                   "measured": "now", "full_row": pairs.FULL_ROW,
                                                   "targets": {"peak_rss_ratio": 1.5, "time_per_pair_ratio": 1.3},
                                                   **r}})
    assert "MISSED 1.5x by 0.10x" in text and "MISSED 1.3x by 0.10x" in text
    assert pairs.ratios([_row(64, 2.0, 0.5)]) == {}


def test_results_readme_section_without_a_machine_section(tmp_path):
    """A benchmark run holding only a pairs row (a smoke run on a tiny model into another --out)
    records no machine section; the results README section is still written."""
    from bench import report

    readme = tmp_path / "README.md"
    readme.write_text("# Results\n\n## Benchmarks\n\nold\n\n## Next\n\nkept\n")
    row = {"id": "pairs_time", "what": "time per pair", "model": "gemma", "measured": 1.1, "cmp": "<=",
           "target": 1.3, "status": "met"}
    report.update_results_readme(readme, [row], {"gemma": {"pairs_scaling": {}}})
    text = readme.read_text()
    assert "time per pair" in text and "old" not in text and "## Next\n\nkept" in text


def test_cli_record_has_the_process_cpu_seconds_and_the_table_shows_them():
    from bench.suite import cli_peak_rss

    rec = cli_peak_rss(["discover", "--help"])  # a real CLI process, argparse exits 0 after the help
    assert rec["returncode"] == 0 and rec["peak_rss_gib"] > 0
    if rec["method"].startswith("/usr/bin/time"):
        assert 0 < rec["cpu_s"] < 600
    rows = [{**_row(64, 2.0, 0.5), "cpu_s": 41.5}, _row(128, 2.1, 0.5)]
    text = pairs.pairs_section({"pairs_scaling": {"command": "discover", "rows": rows, "batch_size": 16,
                                                   "measured": "now", "full_row": pairs.FULL_ROW,
                                                   "targets": {"peak_rss_ratio": 1.5, "time_per_pair_ratio": 1.3}}})
    assert "| 41.5 | 1.0 |" in text and "process CPU" in text and "| - | 1.0 |" in text
