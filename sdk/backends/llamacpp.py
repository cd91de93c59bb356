"""llama.cpp (``llamacpp``, llama-cpp-python): a GGUF file; no torch anywhere on this path."""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Sequence

import numpy as np

from detox.adapters.llamacpp import gguf_fingerprint, llama_detokenizer, load_llama, wrap_llama
from detox.artifacts.manifest import TargetFingerprint
from detox.backends.base import Backend, LastScores, Row, Sampling, top_info
from detox.fusion import log_softmax
from detox.gguf_reader import read_gguf
from detox.targets import is_gguf, load_hf_target, resolve_target


class LlamaCppBackend(Backend):
    name = "llamacpp"
    supports = "llama_cpp.Llama"
    model_class = ("llama_cpp", "Llama")

    @classmethod
    def load(cls, target: str, *, context_window: int = 2048, seed: int = 0, threads: int | None = None,
             provider: str | None = None) -> "LlamaCppBackend":
        path = resolve_target(target)
        if not is_gguf(path):
            raise ValueError(f"--backend llamacpp needs a .gguf file (or 'smollm2') as --target, got {target!r}")
        if not os.path.isfile(path):
            raise ValueError(f"GGUF file not found: {path}")
        kwargs: dict[str, Any] = {"n_ctx": context_window, "seed": seed}
        if threads:  # default: llama.cpp's choice
            kwargs.update(n_threads=threads, n_threads_batch=threads)
        return cls(load_llama(path, **kwargs), None, path)

    def fingerprint(self) -> TargetFingerprint:
        return gguf_fingerprint(self.source or self.model.model_path)

    def wrap(self, calibrator: Any = None, strength: float | None = None, require_signature: Any = None) -> Any:
        self.fused = wrap_llama(self.model, calibrator=calibrator, strength=strength, require_signature=require_signature)
        return self.fused

    def parameter_count(self) -> int:
        tensors = read_gguf(self.source or self.model.model_path).tensors.values()
        return sum(int(np.prod(t.shape, dtype=np.int64)) for t in tensors)

    def sample(self, prompts: list[str], num_samples: int, max_new_tokens: int, top_p: float, seed: int,
               fused: bool = True) -> list[list[str]]:
        """One completion per sample, seeded per sample (llama.cpp reuses the prompt's KV cache between them); plain
        nucleus sampling: temperature 1, top-p, llama.cpp's other filters (top-k, min-p, repeat penalty) off."""
        llama = self.runner(fused)
        return [[llama.create_completion(prompt, max_tokens=max_new_tokens, temperature=1.0, top_p=top_p, top_k=0,
                                         min_p=0.0, typical_p=1.0, repeat_penalty=1.0,
                                         seed=seed * 1000 + i * num_samples + k)["choices"][0]["text"]
                 for k in range(num_samples)] for i, prompt in enumerate(prompts)]

    def transformers_twin(self, fallback: str | None = None) -> tuple[Any, Any]:
        """The same GGUF, dequantized by transformers."""
        return load_hf_target(self.source or self.model.model_path)

    @classmethod
    def perplexity_problem(cls) -> str | None:
        import importlib.util

        if all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers")):
            return None
        return ("perplexity of llama.cpp generations is computed by transformers on the same GGUF, which this "
                "torch-free install lacks: pass --no-perplexity, or pip install 'detox[hf]'")

    def generate(self, prompt: str, max_new_tokens: int, sample: bool, top_p: float, temperature: float, seed: int,
                 echo: Callable[[str], None], fused: bool = True) -> str:
        kwargs: dict[str, Any] = (
            {"temperature": temperature, "top_p": top_p, "top_k": 0, "min_p": 0.0} if sample else {"temperature": 0.0}
        )
        pieces = []
        for chunk in self.runner(fused).create_completion(prompt, max_tokens=max_new_tokens, seed=seed, stream=True,
                                                          **kwargs):
            pieces.append(chunk["choices"][0]["text"])
            echo(pieces[-1])
        return "".join(pieces)

    def bench_runner(self, prompt: str, tokens: int, fused: bool) -> Callable[[], int]:
        """Greedy decoding of exactly ``tokens`` tokens (``generate`` never stops at end-of-text)."""
        llm, model = self.model, self.runner(fused)
        ids = llm.tokenize(prompt.encode(), add_bos=False)

        def run() -> int:
            llm.reset()
            n = 0
            for n, _ in enumerate(model.generate(ids, temp=0.0), start=1):
                if n == tokens:
                    break
            return n

        return run

    # -- detox serve --------------------------------------------------------------------------------------------

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids as ``Llama.create_completion`` makes them: BOS if the model adds one, special tokens parsed."""
        llama = self.model
        bos = llama.token_bos()
        add_bos = bool(getattr(getattr(llama, "_model", None), "add_bos_token", lambda: True)()) and bos != -1
        return ([bos] if add_bos else []) + llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not hasattr(self, "_chat"):
            self._chat = None
            llama = self.model
            template = llama.metadata.get("tokenizer.chat_template")
            if template:
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter

                def text(t: int) -> str:
                    return llama.detokenize([t], special=True).decode("utf-8", "replace") if t != -1 else ""

                self._chat = Jinja2ChatFormatter(template=template, eos_token=text(llama.token_eos()),
                                                 bos_token=text(llama.token_bos()))
        if self._chat is None:
            raise ValueError("this GGUF file has no chat template (tokenizer.chat_template); use /v1/completions")
        return self._chat(messages=messages).prompt

    def context_limit(self) -> int | None:
        # llama.cpp may round its context up (llama_n_ctx); the Llama's own buffers hold what was asked for
        return int(self.model.n_ctx())

    def _is_end(self, token: int) -> bool:
        model = getattr(self.model, "_model", None)
        if model is not None and hasattr(model, "vocab"):
            import llama_cpp

            return bool(llama_cpp.llama_vocab_is_eog(model.vocab, token))
        return token == self.model.token_eos()

    def _piece(self, token: int) -> str:
        pieces = self.__dict__.setdefault("_pieces", {})
        if token not in pieces:
            pieces[token] = self.model.detokenize([token]).decode("utf-8", "replace")
        return pieces[token]

    def decode(self, rows: Sequence[Row], sampling: Sampling) -> None:
        """One row after the other (llama.cpp decodes one sequence); row ``i`` is seeded with ``seed + i``."""
        from llama_cpp import LogitsProcessorList

        llama, model = self.model, self.runner(sampling.strength is not None, sampling.strength)
        for row in rows:
            if row.done:
                continue
            llama.set_seed(sampling.seed + row.index if sampling.seed is not None else random.randrange(2**31))
            observer = LastScores(lambda s: np.array(s, dtype=np.float64)) if sampling.logprobs else None
            tokens = model.generate(row.prompt_ids, top_k=0, top_p=sampling.top_p, min_p=0.0, temp=sampling.temperature,
                                    repeat_penalty=1.0,
                                    logits_processor=LogitsProcessorList([observer]) if observer else None)
            detokenize = llama_detokenizer(llama)
            ids: list[int] = []
            text = ""
            try:
                for token in tokens:
                    if self._is_end(token):
                        row.finish("stop")
                        break
                    ids.append(int(token))
                    new = detokenize(np.array(ids, dtype=np.intc))
                    piece, text = new[len(text):], new
                    info = None
                    if observer is not None and observer.last is not None:
                        info = top_info(log_softmax(observer.last), int(token), row.top_logprobs, self._piece)
                    if row.push(piece, info) or row.done:
                        break
            finally:
                tokens.close()  # ends llama.cpp's generation (and the fusion's prefetching) now
