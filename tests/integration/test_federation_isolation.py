"""Isolation, proven by the OS: three hospitals and a coordinator on one machine, each under an
OS account of its own (separate uids, no shared groups, every folder mode 0700).

Each hospital's images and its prepared site directory belong to its account and nobody else's;
it prepares its site (`oncoflow site prepare`), approves the coordinator's request (`oncoflow
site approve`) and runs its SuperNode (and so its ClientApps) as that account. The coordinator's
account runs the SuperLink (and so the ServerApp) and the coordinator's flow (MLflow,
registration, packaging); the OS refuses it every site file. The run completes, registers and
packages; then everything the coordinator's account wrote is scanned for the sites' image bytes
(files and decoded pixels), thumbnails, and the sites' paths and file names.

Needs root (it creates the accounts with `useradd` and removes them at the end) and `setpriv`.
The project's interpreter must be reachable by the accounts: a directory on its path that
others cannot traverse (here /root, where pyenv keeps Python) gets `o+x` (traverse by name,
no listing) for the test's duration and its mode back afterwards. Every process runs a snapshot
of the sources taken at the start: a site's approval binds the fingerprint of the code it runs,
and the working tree may change during the minutes the test takes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from hospitals import OVERRIDES as SMALL_FEDERATION
from hospitals import write_hospitals

from components.federated.local_deployment import LocalDeployment, RunAs
from components.telemetry import TELEMETRY_OFF

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~6 min on a busy 2-core machine
ROOT = Path(__file__).resolve().parents[2]
SITES = ("hospital-1", "hospital-2", "hospital-3")
ACCOUNT_PREFIX = "oncoflow-iso-"  # the accounts this test creates (or reuses) and removes
OVERRIDES = [
    *SMALL_FEDERATION,
    "federation.rounds=2",
    "federation.engine=deployment",
    "package.build_bento=false",
]
WINDOW = 48  # bytes of a needle taken from an image
SOURCES = ("components", "flows", "validation", "serving", "ui", "conf", "bench")


def _missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root: it creates one OS account per hospital and one for the coordinator"
    missing = [tool for tool in ("useradd", "userdel", "setpriv") if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (util-linux / passwd) to create and switch accounts"
    return None


# --------------------------------------------------------------------------- accounts


@dataclass
class Account:
    """An OS account of the test and the folder that is its own (mode 0700)."""

    name: str
    uid: int
    gid: int
    folder: Path
    sources: Path  # the snapshot of the project every process of the test runs

    @property
    def home(self) -> Path:
        return self.folder / "home"

    @property
    def run_as(self) -> RunAs:
        return RunAs(self.uid, self.gid, self.home)

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": f"{ROOT / '.venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "TMPDIR": str(self.home),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "ONCOFLOW_WORKSPACE": str(self.folder / "workspace"),
            "PYTHONPATH": str(self.sources),
            **TELEMETRY_OFF,
            **extra,
        }

    def command(self, *args: str) -> list[str]:
        switch = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        return [*switch, "--", *args]

    def run(self, *args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(*args),
            cwd=self.sources,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )

    def oncoflow(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "flows.cli", *args, timeout=timeout)

    def own(self, path: Path) -> None:
        """`path` and everything below it belongs to this account, private (0700 / 0600)."""
        for item in [path, *path.rglob("*")]:
            os.chown(item, self.uid, self.gid, follow_symlinks=False)
            if not item.is_symlink():
                item.chmod(0o700 if item.is_dir() else 0o600)


def _ids(name: str) -> tuple[int, int] | None:
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


@contextlib.contextmanager
def accounts(roles: list[str], base: Path, sources: Path):
    """One account per role (created if missing, removed at the end if created here)."""
    created, made = [], {}
    try:
        for role in roles:
            name = ACCOUNT_PREFIX + role
            if _ids(name) is None:
                subprocess.run(
                    [
                        "useradd",
                        "--system",
                        "--user-group",
                        "--no-create-home",
                        "--home-dir",
                        "/nonexistent",
                        "--shell",
                        "/usr/sbin/nologin",
                        name,
                    ],
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
                created.append(name)
            uid, gid = _ids(name)
            folder = base / role
            (folder / "home").mkdir(parents=True)
            made[role] = Account(name, uid, gid, folder, sources)
            made[role].own(folder)
        yield made
    finally:
        for name in created:
            subprocess.run(["userdel", name], capture_output=True, timeout=60, check=False)


@contextlib.contextmanager
def traversable(paths: list[Path]):
    """Give others `o+x` on every directory above `paths` that lacks it; restore afterwards."""
    changed: list[tuple[Path, int]] = []
    try:
        for path in paths:
            for directory in [*reversed(path.parents)]:
                mode = directory.stat().st_mode
                if not mode & stat.S_IXOTH and directory not in [d for d, _ in changed]:
                    changed.append((directory, stat.S_IMODE(mode)))
                    directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        yield
    finally:
        for directory, mode in reversed(changed):
            directory.chmod(mode)


# --------------------------------------------------------------------------- needles


def _window(data: bytes) -> bytes | None:
    """A 48-byte piece of `data` with many distinct values (no false match on flat areas)."""
    best, best_distinct = None, 0
    for start in range(0, max(1, len(data) - WINDOW), WINDOW // 2):
        piece = data[start : start + WINDOW]
        distinct = len(set(piece))
        if len(piece) == WINDOW and distinct > best_distinct:
            best, best_distinct = piece, distinct
    return best if best_distinct >= 16 else None


def image_needles(images: list[Path], site_dirs: list[Path]) -> dict[bytes, str]:
    """Byte strings that betray a site image: a piece of every image file, of its decoded
    pixels (H,W,C) and of every training/validation/test array the sites hold (C,H,W as the
    ClientApps read them)."""
    from PIL import Image

    from components.federated.task import load_site_test, read_split

    needles: dict[bytes, str] = {}
    for path in images:
        raw = path.read_bytes()
        needles[raw[len(raw) // 2 : len(raw) // 2 + WINDOW]] = f"bytes of {path.name}"
        pixels = np.asarray(Image.open(path))
        for piece in (_window(pixels.tobytes()), _window(pixels.transpose(2, 0, 1).tobytes())):
            if piece:
                needles[piece] = f"pixels of {path.name}"
    for site_dir in site_dirs:
        splits = [read_split(site_dir / f"{s}.npz") for s in ("train", "val")]
        for x, _ in [*splits, load_site_test(site_dir)]:
            for i, image in enumerate(x):
                for piece in (
                    _window(image.tobytes()),
                    _window(image.transpose(1, 2, 0).tobytes()),
                ):
                    if piece:
                        needles[piece] = f"array image {i} of {site_dir.name}"
    return needles


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def image_like(path: Path, data: bytes) -> list[str]:
    """Why `data` (a file of the coordinator) may hold an image small enough to be a site
    image or a thumbnail: a PNG/JPEG of 64 px or less, an embedded data URI, an image-shaped
    uint8 array in an .npz."""
    from PIL import Image

    found = []
    if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff":
        with Image.open(io.BytesIO(data)) as image:
            if max(image.size) <= 64:
                found.append(f"a {image.size} image")
    if b"data:image/" in data:
        found.append("an embedded data:image URI")
    if data[:4] == b"PK\x03\x04" and path.suffix == ".npz":
        with zipfile.ZipFile(io.BytesIO(data)) as archive, np.load(path) as arrays:
            for key in (name.removesuffix(".npy") for name in archive.namelist()):
                if arrays[key].dtype == np.uint8 and arrays[key].ndim >= 3:
                    found.append(f"a uint8 array {key} {arrays[key].shape}")
    return found


# --------------------------------------------------------------------------- the test


def _ok(proc: subprocess.CompletedProcess, what: str) -> str:
    assert proc.returncode == 0, (
        f"{what}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n" + (proc.stderr[-3000:])
    )
    return proc.stdout


def _refused(account: Account, *args: str) -> None:
    proc = account.run(*args, timeout=60)
    assert proc.returncode != 0, f"{account.name} could run {args}: {proc.stdout[:200]}"
    assert "Permission denied" in proc.stderr, proc.stderr


def snapshot(target: Path) -> Path:
    """A world-readable copy of the project's sources (what every process of the test runs)."""
    for name in SOURCES:
        shutil.copytree(ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
    for item in [target, *target.rglob("*")]:
        item.chmod(0o755 if item.is_dir() else 0o644)
    return target


@pytest.fixture
def base(monkeypatch):
    reason = _missing_requirements()
    if reason:
        pytest.skip(reason)
    path = Path(tempfile.mkdtemp(prefix="oncoflow-isolation-", dir="/tmp"))
    path.chmod(0o711)  # each account may reach its own folder, nobody may list the base
    # the SuperLink/SuperNodes this process starts (and their apps) run the snapshot too
    monkeypatch.setenv("PYTHONPATH", str(path / "src"))
    python = Path(os.path.realpath(sys.executable))
    with traversable([python, Path(sys.base_prefix) / "lib", ROOT / ".venv" / "bin"]):
        try:
            yield path
        finally:
            if not os.environ.get("ONCOFLOW_KEEP_ISOLATION"):
                shutil.rmtree(path, ignore_errors=True)


def test_sites_and_coordinator_under_separate_accounts_share_nothing_but_weights(base):
    sources = snapshot(base / "src")
    staging = write_hospitals(base / "staging", source_root=sources)
    with accounts(["coord", *SITES], base, sources) as acct:
        coord = acct["coord"]
        hospitals = {name: acct[name] for name in SITES}
        data = {name: h.folder / "data" for name, h in hospitals.items()}
        site_dirs = {name: h.folder / "site" for name, h in hospitals.items()}
        for name, hospital in hospitals.items():
            shutil.move(staging / name, data[name])
            hospital.own(hospital.folder)
        shutil.rmtree(staging)
        images = sorted(p for d in data.values() for p in d.rglob("*.png"))
        assert len(images) == 90

        # each hospital prepares its own site, as its own account
        for name, hospital in hospitals.items():
            _ok(
                hospital.oncoflow(
                    "site", "prepare", str(data[name]), "--site", name, "--out",
                    str(site_dirs[name]), *OVERRIDES,
                ),
                f"site prepare {name}",
            )  # fmt: skip
            for path in (hospital.folder, data[name], site_dirs[name]):
                info = path.stat()
                assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (hospital.uid, 0o700), path

        # the OS keeps every account out of every other account's folder
        for name in SITES:
            image = next(data[name].rglob("*.png"))
            _refused(coord, "cat", str(image))
            _refused(coord, "ls", str(site_dirs[name]))
            _refused(coord, "cat", str(site_dirs[name] / "train.npz"))
            other = hospitals[SITES[(SITES.index(name) + 1) % len(SITES)]]
            _refused(other, "cat", str(image))
        _refused(hospitals["hospital-1"], "ls", str(coord.folder))

        # the coordinator writes its approval request; each hospital receives it and approves
        sites = [arg for name in SITES for arg in ("--site", name)]
        request = coord.home / "site_request.json"
        _ok(coord.oncoflow("fl", "request", *sites, "--out", str(request), *OVERRIDES), "request")
        for name, hospital in hospitals.items():
            received = shutil.copy(request, hospital.home / "site_request.json")
            hospital.own(Path(received))
            out = hospital.oncoflow("site", "approve", str(site_dirs[name]), received, "--accept")
            assert '"recorded": "accepted"' in _ok(out, f"site approve {name}")

        # the SuperLink machine (the coordinator's account) and one SuperNode per hospital (its
        # own account), started and watched by this (root) process
        from components.config import compose, to_container
        from components.federated.coordinator import coordinator_layout

        cfg = to_container(compose(["training=federated", *OVERRIDES]))
        link = coord.folder / "link"
        layout = coordinator_layout(cfg, list(SITES), link, site_dirs=site_dirs)
        run_as = {"superlink": coord.run_as} | {n: h.run_as for n, h in hospitals.items()}
        logs = coord.folder / "logs"
        with LocalDeployment(layout, tls=True, run_as=run_as) as deployment:
            coord.own(coord.folder)  # certificates, flwr_home, SuperLink state: the coordinator's
            deployment.start()
            assert psutil.Process(deployment.superlink.pid).uids().real == coord.uid
            for name, process in deployment.supernodes.items():
                assert psutil.Process(process.pid).uids().real == hospitals[name].uid
            logs.mkdir()
            ca = str(deployment.certs.ca_cert)
            with (
                open(logs / "coordinator.out", "w") as out,
                open(logs / "coordinator.err", "w") as err,
            ):
                coordinator = subprocess.Popen(
                    coord.command(
                        sys.executable, "-m", "flows.cli", "fl", "coordinate", *sites,
                        "--superlink", deployment.address, "--root-cert", ca, *OVERRIDES,
                    ),
                    cwd=sources,
                    env=coord.env(),
                    stdout=out,
                    stderr=err,
                )  # fmt: skip
                try:
                    code = coordinator.wait(timeout=1200)
                finally:
                    if coordinator.poll() is None:
                        coordinator.kill()
            # every Flower process still alive runs as its own account (ServerApps/ClientApps
            # have ended; their SuperExec parents are still here)
            owners = {deployment.superlink.pid: coord.uid}
            owners |= {p.pid: hospitals[n].uid for n, p in deployment.supernodes.items()}
            for pid, uid in owners.items():
                for child in psutil.Process(pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        assert child.uids().real == uid, child.cmdline()
            superlink_log = deployment.log_tail("superlink", lines=60)
        coord.own(logs)
        output = (logs / "coordinator.out").read_text(errors="replace")
        errors = (logs / "coordinator.err").read_text(errors="replace")
        assert code == 0, errors[-5000:] + "\n--- SuperLink ---\n" + superlink_log
        summary = json.loads(output[output.rfind("\n{\n") + 1 :])
        assert summary["approved"] == list(SITES)
        assert summary["rounds"] == 2 and summary["champion"] is True and summary["bento_model"]
        assert 0 <= summary["pooled_metrics"]["macro_f1"] <= 1

        # ---- what the coordinator's account wrote: no image, thumbnail, site path or name
        written = files_under(coord.folder)
        workspace = coord.folder / "workspace"
        run_dir = Path(summary["run_dir"])
        for expected in (
            run_dir / "federation" / "server" / "out" / "result.json",
            workspace / "mlflow.db",
            coord.home / "logs" / "superlink.log",
            link / "superlink" / "state.db",
            logs / "coordinator.err",
        ):
            assert expected in written, f"{expected} not written: the scan would prove nothing"
        assert any("mlartifacts" in p.parts for p in written)
        assert any("bentoml" in p.parts and p.name == "model.yaml" for p in written)
        bundles = [p for p in written if p.name == "bundle.json"]
        assert bundles and not [p for p in written if p.name == "embeddings.npz"]
        for path in bundles:  # the bundle (and its MLflow copy) says what it holds
            contents = json.loads(path.read_text())["contents"]
            assert contents["training_images"] is False and contents["case_index"] == 0

        needles = image_needles(images, list(site_dirs.values()))
        assert len(needles) >= 3 * len(images)
        # the scan finds what it looks for: each site's own partition holds its images
        for site_dir in site_dirs.values():
            own = (site_dir / "train.npz").read_bytes()
            assert sum(piece in own for piece in needles) >= 10, site_dir
        names = {p.name for p in images} | {p.stem for p in images}
        paths = {str(h.folder) for h in hospitals.values()} | {str(p) for p in images}
        texts = {text.encode(): text for text in names | paths}
        leaks = []
        for path in written:
            blob = path.read_bytes()
            leaks += [f"{path}: {why}" for piece, why in needles.items() if piece in blob]
            leaks += [f"{path}: names {text}" for raw, text in texts.items() if raw in blob]
            leaks += [f"{path}: {why}" for why in image_like(path, blob)]
        assert not leaks, "\n".join(leaks[:40])
