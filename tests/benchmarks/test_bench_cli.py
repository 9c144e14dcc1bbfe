"""`oirl bench`: unknown benchmarks and a --quick a benchmark lacks are refused with a clear message
(the quick runs themselves go through `oirl bench` in test_sync_bench.py, test_rollout_bench.py and
test_bench_e2e.py)."""

import subprocess
import sys

from oirl.config import REPO_ROOT


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oirl.cli", "bench", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_quick_is_refused_where_the_benchmark_has_none():
    proc = bench("gsm8k", "--quick", "--out", "/tmp/never-written")
    assert proc.returncode == 2 and "no --quick mode" in proc.stderr


def test_an_unknown_name_is_an_argparse_error():
    proc = bench("nope", "--out", "/tmp/never-written")
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr
