"""`python -m benchmarks.gpu_check`: the GPU check (see the package's docstring)."""

import sys

from benchmarks.gpu_check.run import main

if __name__ == "__main__":
    sys.exit(main())
