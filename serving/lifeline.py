"""Server processes die with their parent: none outlives the one that started it.

`die_with_parent` asks the Linux kernel to kill this process when its parent exits, whatever
the way (``kill -9`` included). ``python -m serving.lifeline PARENT_PID -- CMD...`` does that,
then execs CMD (the setting survives exec): `oncoflow serve` starts ``bentoml serve`` so, and
each BentoML worker calls `die_with_parent` itself, so a killed launcher or arbiter takes its
children along and frees the port for the next start.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent exits (Linux; elsewhere a
    no-op). `parent`: the pid the parent should have; if it has gone already (this process was
    re-parented before the call), exit at once."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def main(argv: list[str]) -> None:
    """``PARENT_PID -- CMD...``: die with PARENT_PID, run CMD in this process."""
    parent, separator, *command = argv
    if separator != "--" or not command:
        raise SystemExit("usage: python -m serving.lifeline PARENT_PID -- CMD...")
    die_with_parent(int(parent))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
