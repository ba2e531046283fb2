"""Load the assistant's knowledge notes (markdown with YAML front matter) and cut them into
section-sized chunks for retrieval.

A note looks like::

    ---
    id: glioma
    title: Glioma
    audience: [patient, clinician]
    keywords: [...]
    sources: ["Louis DN, ... https://doi.org/..."]
    ---
    # Glioma
    ## What a glioma is
    ...

Each `## ` section becomes one `Chunk`; the text before the first section (if any) is kept
under the section name "Overview".
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from components.errors import DataError

KNOWLEDGE_DIR = Path(__file__).resolve().parent / "knowledge"
_REQUIRED = ("id", "title", "sources")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,63}$")


@dataclass(frozen=True)
class Note:
    """One knowledge note with its metadata."""

    id: str
    title: str
    audience: list[str]
    keywords: list[str]
    sources: list[str]
    body: str


@dataclass(frozen=True)
class Chunk:
    """One section of a note: the unit the retriever ranks and the assistant cites."""

    chunk_id: str
    note_id: str
    title: str
    section: str
    text: str
    keywords: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def embedding_text(self) -> str:
        """What the dense encoder sees: the note title, the section name and the section."""
        return f"{self.title}. {self.section}. {self.text}"

    def lexical_text(self) -> str:
        """What BM25 sees: the embedding text plus the note's keywords."""
        return f"{self.embedding_text()} {' '.join(self.keywords)}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Chunk:
        return cls(**data)


def _split_front_matter(raw: str, path: Path) -> tuple[dict, str]:
    import yaml

    if not raw.startswith("---"):
        raise DataError(f"{path.name}: a knowledge note must start with '---' front matter")
    parts = raw.split("\n---", 1)
    if len(parts) != 2:
        raise DataError(f"{path.name}: front matter is not closed with '---'")
    try:
        meta = yaml.safe_load(parts[0].lstrip("-\n")) or {}
    except yaml.YAMLError as exc:
        raise DataError(f"{path.name}: front matter is not valid YAML ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path.name}: front matter must be a mapping")
    body = parts[1].split("\n", 1)[1] if "\n" in parts[1] else ""
    return meta, body


def load_note(path: Path) -> Note:
    """Parse one note, checking that it names an id, a title and at least one public source."""
    meta, body = _split_front_matter(path.read_text(encoding="utf-8"), path)
    missing = [key for key in _REQUIRED if not meta.get(key)]
    if missing:
        raise DataError(f"{path.name}: front matter lacks {', '.join(missing)}")
    note_id = str(meta["id"])
    if not _ID_RE.match(note_id):
        raise DataError(f"{path.name}: id {note_id!r} must be lowercase letters, digits, '-'")
    sources = [str(s) for s in meta["sources"]]
    return Note(
        id=note_id,
        title=str(meta["title"]),
        audience=[str(a) for a in meta.get("audience", [])],
        keywords=[str(k) for k in meta.get("keywords", [])],
        sources=sources,
        body=body.strip(),
    )


def load_notes(knowledge_dir: str | Path = KNOWLEDGE_DIR) -> list[Note]:
    """All notes of a directory, sorted by id; ids must be unique."""
    folder = Path(knowledge_dir)
    paths = sorted(folder.glob("*.md"))
    if not paths:
        raise DataError(f"no knowledge notes (*.md) found in {folder}")
    notes = [load_note(p) for p in paths]
    seen: set[str] = set()
    for note in notes:
        if note.id in seen:
            raise DataError(f"knowledge note id {note.id!r} is used twice in {folder}")
        seen.add(note.id)
    return sorted(notes, key=lambda n: n.id)


def chunk_note(note: Note) -> list[Chunk]:
    """Split a note at its `## ` headings; the `# ` title line is dropped."""
    sections: list[tuple[str, list[str]]] = [("Overview", [])]
    for line in note.body.splitlines():
        if line.startswith("## "):
            sections.append((line[3:].strip(), []))
        elif line.startswith("# "):
            continue
        else:
            sections[-1][1].append(line)
    chunks = []
    for section, lines in sections:
        text = " ".join(" ".join(lines).split())
        if not text:
            continue
        chunks.append(
            Chunk(
                chunk_id=f"{note.id}#{len(chunks)}",
                note_id=note.id,
                title=note.title,
                section=section,
                text=text,
                keywords=note.keywords,
                sources=note.sources,
            )
        )
    return chunks


def load_chunks(knowledge_dir: str | Path = KNOWLEDGE_DIR) -> list[Chunk]:
    """Every chunk of every note in `knowledge_dir`, in a stable order."""
    return [chunk for note in load_notes(knowledge_dir) for chunk in chunk_note(note)]


def knowledge_fingerprint(knowledge_dir: str | Path = KNOWLEDGE_DIR) -> str:
    """SHA-256 over the notes' names and bytes, to tell whether an index is stale."""
    digest = hashlib.sha256()
    for path in sorted(Path(knowledge_dir).glob("*.md")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
