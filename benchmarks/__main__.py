"""Run every benchmark in turn: `python -m benchmarks` (add --quick for a short pass)."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ["harness_overhead", "loader_throughput", "host_ram", "feature_cache", "start_time"]


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    failed = 0
    for name in BENCHMARKS:
        args = [sys.executable, "-m", f"benchmarks.{name}"]
        if quick and name == "harness_overhead":
            args.append("--quick")
        if quick and name == "feature_cache":
            args += ["--epochs", "3", "--train-images", "2000", "--test-images", "500"]
        print(f"\n=== {name} ===", flush=True)
        failed += subprocess.run(args).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
