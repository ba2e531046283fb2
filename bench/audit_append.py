"""CPU and wall time of one entry in the service's audit log (`components.audit.open_log`), the
append every API call makes, in a fresh SQLite file.

    python bench/audit_append.py [--entries 500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from components.audit import open_log
    from serving.middleware import API_CLIENT

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=500)
    args = parser.parse_args(argv)
    details = {"key": "bench", "status": 200, "request": "0123456789abcdef"}
    with tempfile.TemporaryDirectory() as tmp:
        log = open_log(Path(tmp) / "service.db")
        for _ in range(20):  # the file, its schema and SQLite's caches
            log.record(API_CLIENT, "service.predict", details=details)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.entries):
            log.record(API_CLIENT, "service.predict", details=details)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert log.verify().ok
    print(
        f"{args.entries} entries: {wall / args.entries * 1000:.3f} ms wall, "
        f"{cpu / args.entries * 1000:.3f} ms CPU per entry"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
