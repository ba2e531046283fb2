"""Chat latency of the grounded assistant on this CPU.

Three paths, each timed per question (wall clock), reported as p50/p95/mean:
- retrieval only: MiniLM query embedding + BM25 + fusion over the prebuilt index;
- extractive answer: `Assistant.answer` end to end with the default extractive backend
  (retrieval, composition, grounding checks, history);
- local LLM answer: `Assistant.stream` with SmolLM2-135M-Instruct (GGUF, dequantised to
  float32 by transformers), greedy, `--max-new-tokens`; time to the first checked piece is
  reported too, with how many answers fell back to the extractive one. Model load time is
  reported separately.

torch uses 1 CPU thread by default (`--threads 0` keeps torch's own default): on a shared
2-core machine two OpenMP threads per process make MiniLM ~50x slower. Timings on a shared
machine are noisy; the load average at start is printed with the results.

    python bench/chat_latency.py                    # all three, ~1-3 minutes
    python bench/chat_latency.py --skip-llm --json /tmp/chat.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CASE = {
    "predicted_label": "glioma_tumor",
    "probabilities": {
        "glioma_tumor": 0.81,
        "meningioma_tumor": 0.11,
        "no_tumor": 0.03,
        "pituitary_tumor": 0.05,
    },
    "gradcam_summary": "heat concentrated in the upper-left quadrant, 62% of it in the top 10% "
    "of pixels",
    "model_card": {"name": "oncoflow-brain_tumor_mri", "version": "1", "privacy": {"epsilon": 8}},
}
LLM_QUESTIONS = ["What is a meningioma?", "Why did it say glioma?", "What does ε=8 mean?"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarise(name: str, seconds: list[float], **extra) -> dict:
    return {
        "path": name,
        "n": len(seconds),
        "p50_ms": 1000 * percentile(seconds, 0.5),
        "p95_ms": 1000 * percentile(seconds, 0.95),
        "mean_ms": 1000 * statistics.fmean(seconds),
        **extra,
    }


def bench_retrieval(retriever, questions: list[str]) -> dict:
    retriever.search(questions[0])  # warm-up
    times = []
    for question in questions:
        start = time.perf_counter()
        retriever.search(question)
        times.append(time.perf_counter() - start)
    return summarise("retrieval only", times)


def bench_extractive(assistant, questions: list[str], case) -> dict:
    assistant.answer(questions[0], "warm-up")
    times, refused = [], 0
    for i, question in enumerate(questions):
        start = time.perf_counter()
        answer = assistant.answer(question, f"s{i}", case if i % 3 == 0 else None)
        times.append(time.perf_counter() - start)
        refused += answer.refused
    return summarise("extractive answer", times, refused=refused)


def bench_local_llm(retriever, questions: list[str], case, max_new_tokens: int, cache) -> dict:
    from components.assistant import Answer, Assistant
    from components.assistant.backends.local_llm import LocalLLMBackend

    backend = LocalLLMBackend(max_new_tokens=max_new_tokens, cache_dir=cache)
    start = time.perf_counter()
    backend.load()
    load_s = time.perf_counter() - start
    assistant = Assistant(retriever, backend)
    times, first_piece, fallbacks, reasons = [], [], 0, []
    for i, question in enumerate(questions):
        start = time.perf_counter()
        first, final = None, None
        question_case = case if "why" in question.lower() else None
        for item in assistant.stream(question, f"llm{i}", question_case):
            if first is None and not isinstance(item, Answer):
                first = time.perf_counter() - start
            if isinstance(item, Answer):
                final = item
        times.append(time.perf_counter() - start)
        first_piece.append(first if first is not None else times[-1])
        if final.backend != "local":
            fallbacks += 1
            reasons.append(final.fallback_reason)
    row = summarise(
        f"local LLM answer ({max_new_tokens} new tokens)",
        times,
        first_piece_p50_ms=1000 * percentile(first_piece, 0.5),
        fallbacks_to_extractive=fallbacks,
        fallback_reasons=reasons,
    )
    row["model_load_s"] = load_s
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=30, help="retrieval/extractive runs")
    parser.add_argument("--llm-questions", type=int, default=3, help="local LLM runs (max 3)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--llm-cache", help="dir to keep the dequantised model (faster reload)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 = default")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from components.assistant import Assistant, CaseContext, Retriever, build_index, load_index
    from components.assistant.evaluate import load_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    items, out_of_scope = load_eval()
    pool = [item.question for item in items] + out_of_scope
    questions = [pool[(i * 7) % len(pool)] for i in range(args.questions)]
    case = CaseContext.from_dict(CASE)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        build_index(out_path=tmp)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        retriever = Retriever(load_index(tmp))
        retriever_load_s = time.perf_counter() - start

    rows = [
        bench_retrieval(retriever, questions),
        bench_extractive(Assistant(retriever), questions, case),
    ]
    if not args.skip_llm:
        llm_questions = LLM_QUESTIONS[: max(1, min(args.llm_questions, 3))]
        rows.append(
            bench_local_llm(retriever, llm_questions, case, args.max_new_tokens, args.llm_cache)
        )

    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m_at_start": load_avg,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "index_build_s": build_s,
        "retriever_load_s": retriever_load_s,
        "retrieval_mode": retriever.mode,
        "rows": rows,
    }
    print(
        f"cpus={result['machine']['cpus']} load_avg={load_avg} "
        f"torch_threads={result['machine']['torch_threads']} retrieval={retriever.mode}"
    )
    print(f"index build {build_s:.1f} s, retriever load {retriever_load_s:.1f} s")
    print(f"{'path':<36}{'n':>4}{'p50 ms':>10}{'p95 ms':>10}{'mean ms':>10}")
    for row in rows:
        print(
            f"{row['path']:<36}{row['n']:>4}{row['p50_ms']:>10.0f}{row['p95_ms']:>10.0f}"
            f"{row['mean_ms']:>10.0f}"
        )
    for row in rows:
        if "model_load_s" in row:
            print(
                f"local LLM: load {row['model_load_s']:.1f} s, first checked piece p50 "
                f"{row['first_piece_p50_ms']:.0f} ms, fell back to extractive "
                f"{row['fallbacks_to_extractive']}/{row['n']}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
