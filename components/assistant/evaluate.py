"""Retrieval evaluation: recall@1/3/5 and MRR over eval/retrieval_eval.yaml, plus the share of
out-of-scope questions that retrieve nothing.

    python -m components.assistant.evaluate [--index DIR] [--json PATH] [--bm25-only]

Exits with status 1 when recall@3 is below --min-recall (0.9) or the out-of-scope rejection
rate is below --min-rejection (0.9).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from components.errors import DataError

EVAL_PATH = Path(__file__).resolve().parent / "eval" / "retrieval_eval.yaml"


@dataclass(frozen=True)
class EvalItem:
    question: str
    notes: list[str]


@dataclass
class EvalReport:
    mode: str
    n_questions: int
    recall_at_1: float
    recall_at_3: float
    recall_at_5: float
    mrr: float
    n_out_of_scope: int
    out_of_scope_rejection: float
    misses_at_3: list[dict] = field(default_factory=list)
    false_accepts: list[dict] = field(default_factory=list)

    def table(self) -> str:
        rows = [
            ("retrieval mode", self.mode),
            ("questions", str(self.n_questions)),
            ("recall@1", f"{self.recall_at_1:.3f}"),
            ("recall@3", f"{self.recall_at_3:.3f}"),
            ("recall@5", f"{self.recall_at_5:.3f}"),
            ("MRR", f"{self.mrr:.3f}"),
            ("out-of-scope questions", str(self.n_out_of_scope)),
            ("out-of-scope rejected", f"{self.out_of_scope_rejection:.3f}"),
        ]
        return "\n".join(f"{name:<24}{value}" for name, value in rows)


def load_eval(path: str | Path = EVAL_PATH) -> tuple[list[EvalItem], list[str]]:
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    try:
        items = [EvalItem(str(q["q"]), [str(n) for n in q["notes"]]) for q in data["questions"]]
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path}: each question needs 'q' and 'notes' ({exc})") from exc
    return items, [str(q) for q in data.get("out_of_scope", [])]


def evaluate_retrieval(retriever, path: str | Path = EVAL_PATH) -> EvalReport:
    """Score `retriever.rank_notes` on the evaluation set; unknown note ids are an error."""
    items, out_of_scope = load_eval(path)
    known = retriever.note_ids
    unknown = sorted({n for item in items for n in item.notes} - known)
    if unknown:
        raise DataError(f"the evaluation set names notes that do not exist: {unknown}")
    hits = {1: 0, 3: 0, 5: 0}
    reciprocal = 0.0
    misses = []
    for item in items:
        ranked = retriever.rank_notes(item.question, k=5)
        rank = next((i for i, note in enumerate(ranked, 1) if note in item.notes), None)
        for k in hits:
            hits[k] += int(rank is not None and rank <= k)
        reciprocal += 1.0 / rank if rank else 0.0
        if rank is None or rank > 3:
            misses.append({"question": item.question, "expected": item.notes, "got": ranked[:3]})
    false_accepts = []
    for question in out_of_scope:
        ranked = retriever.rank_notes(question, k=3)
        if ranked:
            false_accepts.append({"question": question, "got": ranked})
    n = len(items)
    return EvalReport(
        mode=retriever.mode,
        n_questions=n,
        recall_at_1=hits[1] / n,
        recall_at_3=hits[3] / n,
        recall_at_5=hits[5] / n,
        mrr=reciprocal / n,
        n_out_of_scope=len(out_of_scope),
        out_of_scope_rejection=1 - len(false_accepts) / max(len(out_of_scope), 1),
        misses_at_3=misses,
        false_accepts=false_accepts,
    )


def main(argv: list[str] | None = None) -> int:
    from components.assistant.index import build_index, load_index
    from components.assistant.retriever import Retriever

    parser = argparse.ArgumentParser(description="Evaluate the assistant's retrieval.")
    parser.add_argument("--index", help="prebuilt index dir (default: build from the notes)")
    parser.add_argument("--eval", default=str(EVAL_PATH), help="evaluation YAML")
    parser.add_argument("--bm25-only", action="store_true", help="evaluate the lexical fallback")
    parser.add_argument("--min-recall", type=float, default=0.9)
    parser.add_argument("--min-rejection", type=float, default=0.9)
    parser.add_argument("--json", help="write the report as JSON here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 = default")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # one query at a time gains nothing from more
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    index = load_index(args.index) if args.index else build_index(dense=not args.bm25_only)
    retriever = Retriever(index, load_embedder=not args.bm25_only)
    report = evaluate_retrieval(retriever, args.eval)
    print(report.table())
    for miss in report.misses_at_3:
        print(f"miss@3: {miss['question']!r} expected {miss['expected']} got {miss['got']}")
    for fa in report.false_accepts:
        print(f"out-of-scope accepted: {fa['question']!r} -> {fa['got']}")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1), encoding="utf-8")
    ok = report.recall_at_3 >= args.min_recall
    ok = ok and report.out_of_scope_rejection >= args.min_rejection
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
