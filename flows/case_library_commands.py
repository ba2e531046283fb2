"""`oncoflow case-library build`: a serving site's own similar-case library.

The hospital that serves a model embeds its own labelled images (one sub-folder per class)
with that model, so `/similar` shows the site's own cases and the model bundle needs no
training images (`components.case_library`). Imports nothing heavy until the command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_case_library_parser(sub: argparse._SubParsersAction) -> None:
    """Add `case-library` and its sub-command to the `oncoflow` sub-parsers `sub`."""
    library = sub.add_parser(
        "case-library", help="build this site's similar-case library for a served model"
    )
    library_sub = library.add_subparsers(dest="library_command", required=True, metavar="CMD")
    build = library_sub.add_parser(
        "build", help="embed this site's labelled images with the model (for serve --case-library)"
    )
    build.add_argument(
        "--images", required=True, help="folder with one sub-folder of images per class"
    )
    build.add_argument(
        "--model",
        default="oncoflow-model:latest",
        help="Bento model tag, or a model bundle directory (default: oncoflow-model:latest)",
    )
    build.add_argument("--out", required=True, help="where the library is written")


def run_case_library(args: argparse.Namespace) -> int:
    from components.bundle import ModelBundle
    from components.case_library import build_from_folder, library_summary

    bundle = ModelBundle.load(_bundle_dir(args.model))
    out = build_from_folder(bundle, args.images, args.out)
    summary = library_summary(out)
    print(json.dumps({"library": str(out), **summary}, indent=2))
    print(f"serve with: oncoflow serve --model {args.model} --case-library {out}")
    return 0


def _bundle_dir(model: str) -> Path:
    """A bundle directory as given, or the Bento model store's copy of tag `model`."""
    path = Path(model).expanduser()
    if (path / "bundle.json").is_file():
        return path
    from flows.runtime import prepare

    prepare([])  # the workspace's Bento store, unless BENTOML_HOME says otherwise
    from serving.model_store import load_model_ref

    return Path(load_model_ref(model).path)
