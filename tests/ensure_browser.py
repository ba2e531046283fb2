"""Make sure a headless Chromium is available for the browser tests (Debian's package).

Installs `chromium` with apt-get when it is missing and we are root (CI, fresh machines);
otherwise says what to do. Never downloads a browser build of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
PACKAGES = ("chromium", "fonts-dejavu-core")


def find_browser() -> str | None:
    explicit = os.environ.get("ONCOFLOW_CHROMIUM")
    if explicit and os.path.exists(explicit):
        return explicit
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def main() -> int:
    if find_browser():
        return 0
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("browser tests need Chromium: install Debian's 'chromium' package", file=sys.stderr)
        return 0  # the e2e tests skip themselves with the same message
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        check=True,
        env=env,
    )
    print(f"installed {find_browser()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
