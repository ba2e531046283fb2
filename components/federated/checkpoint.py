"""Round checkpoints and the round ledger of a federated run.

After every completed round the server writes `round-NNNN/` (global weights `arrays.npz` and
`state.json`: round, history, rejections, strategy state, settings fingerprint) atomically
(written under a temporary name, then renamed), keeps the newest `keep`, and rewrites
`ledger.jsonl` (one line per completed round). A restarted run with the same settings
fingerprint resumes after the newest checkpoint; a checkpoint from different settings is
refused rather than silently mixed in.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.errors import ConfigError

log = logging.getLogger(__name__)

_PREFIX = "round-"
_ARRAYS = "arrays.npz"
_STATE = "state.json"
LEDGER = "ledger.jsonl"
CHECKPOINT_DIR = "checkpoints"  # under the run's output directory


@dataclass
class Checkpoint:
    """The global model and server state after `round`."""

    round: int
    arrays: dict[str, np.ndarray]
    state: dict[str, Any]
    path: Path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class CheckpointStore:
    """Checkpoints of one federated run under `directory`, tied to a settings `fingerprint`."""

    def __init__(self, directory: str | Path, fingerprint: str, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.keep = max(1, int(keep))

    def _rounds(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            name = path.name
            number = name[len(_PREFIX) :]
            complete = (path / _STATE).is_file() and (path / _ARRAYS).is_file()
            if name.startswith(_PREFIX) and number.isdigit() and complete:
                found.append((int(number), path))
        return sorted(found)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None; `ConfigError` if it is from other settings."""
        rounds = self._rounds()
        if not rounds:
            return None
        number, path = rounds[-1]
        state = json.loads((path / _STATE).read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                f"the checkpoint in {self.directory} was written with different federation "
                "settings or data; delete that directory to start over, or set "
                "federation.resume=false"
            )
        with np.load(path / _ARRAYS, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        return Checkpoint(round=number, arrays=arrays, state=state, path=path)

    def save(self, server_round: int, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> Path:
        """Write the checkpoint of `server_round` atomically, then prune old ones."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{_PREFIX}{server_round:04d}"
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        np.savez(tmp / _ARRAYS, **{k: np.asarray(v) for k, v in arrays.items()})
        payload = {**state, "round": server_round, "fingerprint": self.fingerprint}
        (tmp / _STATE).write_text(json.dumps(payload, indent=1, default=_json_default))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in self._rounds()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpointed round %d to %s", server_round, final)
        return final

    def clear(self) -> None:
        for _, path in self._rounds():
            shutil.rmtree(path, ignore_errors=True)


def write_ledger(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite the run's ledger atomically: one JSON line per completed round.

    Rewritten from the checkpointed history after every round, so a resumed run's ledger
    lists each round exactly once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row, default=_json_default) + "\n" for row in rows))
    os.replace(tmp, path)


def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = [
    "CHECKPOINT_DIR",
    "LEDGER",
    "Checkpoint",
    "CheckpointStore",
    "read_ledger",
    "write_ledger",
]
