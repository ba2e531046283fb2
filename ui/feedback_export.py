"""Clinician-confirmed labels as a new, versioned dataset of the site.

Each export is a folder ``<root>/<site>-feedback-v<N>/<true label>/<sha256[:16]>.<ext>`` (the
class-per-folder layout `oncoflow` ingests with ``dataset.adapter=folder``) plus
``manifest.json``: every file's path, label and SHA-256, the class counts, and a content hash
over all ``path label sha256`` lines, so a training run can name exactly what it learnt from.
Only cases with feedback (agree: the prediction is the label; disagree: the clinician's label)
and a stored PNG/JPEG image go in; DICOM uploads are counted and left out (the folder adapter
takes no DICOM, and de-identifying them is the dicom adapter's job at ingest). File names are
content hashes: no case number, case id or date. Admins only; each export is audited.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ui.accounts import User
from ui.cases import CaseStore
from ui.errors import InvalidInput, PermissionDenied

FORMAT = "oncoflow-feedback-export/1"
EXTENSIONS = {"png": "png", "jpeg": "jpg"}
_SITE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class FeedbackExport:
    path: Path
    version: int
    files: int
    classes: dict[str, int]
    content_hash: str
    skipped: dict[str, int] = field(default_factory=dict)


def next_version(root: Path, site: str) -> int:
    pattern = re.compile(rf"^{re.escape(site)}-feedback-v(\d+)$")
    found = [int(m.group(1)) for p in root.glob("*") if (m := pattern.match(p.name))]
    return max(found, default=0) + 1


def export_feedback(cases: CaseStore, actor: User, root: str | Path, site: str) -> FeedbackExport:
    """Write the next version of the site's feedback dataset under `root`."""
    if not (actor.is_admin and actor.active):  # the page passes sessions.admin's fresh user
        raise PermissionDenied("Only an administrator can export the feedback dataset.")
    if not _SITE.match(site or ""):
        raise InvalidInput("The site name is 1-32 lower-case letters, digits, '-' or '_'.")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rated = [c for c in cases.all_cases(actor) if c.has_feedback and c.true_label]
    version = next_version(root, site)
    final = root / f"{site}-feedback-v{version}"
    staging = root / f".{final.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    files, skipped = [], Counter()
    for case in rated:
        try:
            image, kind = cases.image(actor, case.id)
        except Exception:  # cases made before images were kept
            skipped["no stored image"] += 1
            continue
        if "/" in case.true_label or case.true_label.startswith("."):
            skipped["label unusable as a folder name"] += 1
            continue
        if kind not in EXTENSIONS:
            skipped[f"{kind} (not for the folder adapter)"] += 1
            continue
        digest = hashlib.sha256(image).hexdigest()
        relative = f"{case.true_label}/{digest[:16]}.{EXTENSIONS[kind]}"
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # the same image confirmed twice: one file
            skipped["duplicate image"] += 1
            continue
        target.write_bytes(image)
        files.append({"path": relative, "label": case.true_label, "sha256": digest})
    if not files:
        shutil.rmtree(staging, ignore_errors=True)
        raise InvalidInput("There are no clinician-confirmed image cases to export yet.")
    files.sort(key=lambda f: f["path"])
    lines = "".join(f"{f['path']} {f['label']} {f['sha256']}\n" for f in files)
    content_hash = hashlib.sha256(lines.encode()).hexdigest()
    classes = dict(sorted(Counter(f["label"] for f in files).items()))
    manifest = {
        "format": FORMAT,
        "site": site,
        "version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": "labels confirmed by clinicians in the oncoflow UI (feedback)",
        "layout": "<class>/<file> (dataset.adapter=folder)",
        "classes": classes,
        "content_hash": content_hash,
        "files": files,
        "skipped": dict(skipped),
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    staging.rename(final)
    cases.audit.record(
        actor,
        "feedback.export",
        details={"version": version, "files": len(files), "content_hash": content_hash[:16]},
    )
    return FeedbackExport(final, version, len(files), classes, content_hash, dict(skipped))
