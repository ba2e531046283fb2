"""A `bench/` script imported as a module in a test (the benches are scripts, not a package)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


@contextmanager
def bench_module(script: str) -> Iterator[ModuleType]:
    """``bench/<script>.py`` as the module ``bench_<script>``, dropped from `sys.modules` after."""
    spec = importlib.util.spec_from_file_location(f"bench_{script}", BENCH_DIR / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
