"""transformers (``hf``): a ``PreTrainedModel`` and its tokenizer; decoding is transformers' ``generate`` (which the
ONNX Runtime backend, a subclass, shares)."""

from __future__ import annotations

import copy
import random
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Sequence

from detox.artifacts.manifest import TargetFingerprint
from detox.backends.base import Backend, LastScores, Row, Sampling, top_info
from detox.engine import transformers_detokenizer
from detox.fingerprint import fingerprint_gguf, fingerprint_hf
from detox.targets import is_gguf, load_hf_target, resolve_target, stop_token_ids


class HFBackend(Backend):
    name = "hf"
    supports = "transformers causal LMs"
    model_class = ("transformers", "PreTrainedModel")
    batched = True

    @classmethod
    def load(cls, target: str, *, context_window: int = 2048, seed: int = 0, threads: int | None = None,
             provider: str | None = None) -> "HFBackend":
        set_torch_threads(threads)
        model, tokenizer = load_hf_target(target)
        return cls(model, tokenizer, str(resolve_target(target)))

    def fingerprint(self) -> TargetFingerprint:
        if self.source is not None and is_gguf(self.source):
            return fingerprint_gguf(self.source)
        return fingerprint_hf(self.model, self.tokenizer)

    def wrap(self, calibrator: Any = None, strength: float | None = None, require_signature: Any = None) -> Any:
        from detox.adapters.transformers import DetoxModel, load_tokenizer_for
        from detox.resolve import resolve_calibrator

        self.tokenizer = self.tokenizer or load_tokenizer_for(self.model)
        cal = resolve_calibrator(calibrator, fingerprint_hf(self.model, self.tokenizer), require_signature)
        self.fused = DetoxModel(self.model, cal, self.tokenizer, strength)
        return self.fused

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def transformers_twin(self, fallback: str | None = None) -> tuple[Any, Any]:
        return self.model, self.tokenizer

    def _generation(self) -> ContextManager[Any]:
        """Around every ``generate``, fused or not (the ONNX backend limits torch's threads here)."""
        return nullcontext()

    def sample(self, prompts: list[str], num_samples: int, max_new_tokens: int, top_p: float, seed: int,
               fused: bool = True) -> list[list[str]]:
        """One left-padded batch: every prompt's samples in one ``generate``."""
        import torch

        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        torch.manual_seed(seed)
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = self.runner(fused).generate(**batch, do_sample=True, top_p=top_p, top_k=0, temperature=1.0,
                                              max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                                              pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]

    def generate(self, prompt: str, max_new_tokens: int, sample: bool, top_p: float, temperature: float, seed: int,
                 echo: Callable[[str], None], fused: bool = True) -> str:
        import torch

        model = self.runner(fused)
        torch.manual_seed(seed)
        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
        kwargs = {"do_sample": True, "top_p": top_p, "temperature": temperature} if sample else {"do_sample": False}
        with self._generation():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                 **kwargs)
        text = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        echo(text)
        return text

    def bench_runner(self, prompt: str, tokens: int, fused: bool) -> Callable[[], int]:
        import torch

        model = self.runner(fused)
        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
        kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)

        def run() -> int:
            with torch.inference_mode(), self._generation():
                out = model.generate(**inputs, **kwargs)
            return int(out.shape[1] - inputs["input_ids"].shape[1])

        return run

    # -- detox serve --------------------------------------------------------------------------------------------

    def _front(self) -> Any:
        """The tokenizer copy used for encoding and chat templates: serve encodes on its event loop while the worker
        decodes, and a fast tokenizer must not be used by two threads at once."""
        if getattr(self, "_front_tokenizer", None) is None:
            self._front_tokenizer = copy.deepcopy(self.tokenizer)
        return self._front_tokenizer

    def encode(self, text: str, chat: bool = False) -> list[int]:
        return list(self._front()(text, add_special_tokens=not chat)["input_ids"])

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        front = self._front()
        if not getattr(front, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
        return front.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def context_limit(self) -> int | None:
        return getattr(getattr(self.model, "config", None), "max_position_embeddings", None)

    def decode(self, rows: Sequence[Row], sampling: Sampling) -> None:
        """The rows, left-padded, in one ``generate`` call; a streamer hands each step's tokens to the rows and a
        stopping criterion ends each row on its own (its ``max_tokens``, a stop string, or its client leaving)."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        tokenizer = self.tokenizer
        pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        eos_ids = stop_token_ids(self.model, tokenizer)
        width = max(len(row.prompt_ids) for row in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):  # left padding: every row's next token is at the same position
            input_ids[r, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids, dtype=torch.long)
            attention[r, width - len(row.prompt_ids):] = 1

        observer = LastScores(lambda s: s.float().log_softmax(-1).cpu().numpy()) if sampling.logprobs else None
        texts = [""] * len(rows)
        generated: list[list[int]] = [[] for _ in rows]
        detokenizers = [transformers_detokenizer(tokenizer) for _ in rows]

        class Rows(BaseStreamer):
            """Hands each step's tokens to the rows (transformers calls put once with the prompt first)."""

            prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                for r, token in enumerate(value.reshape(-1).tolist()):
                    row = rows[r]
                    if row.done:
                        continue
                    if token in eos_ids:
                        row.finish("stop")
                        continue
                    generated[r].append(token)
                    text = detokenizers[r](generated[r])  # = decode(generated[r], skip_special_tokens=True)
                    piece = ""
                    if not text.endswith("\ufffd"):  # an unfinished character (whole-text decoding): wait for its bytes
                        piece, texts[r] = text[len(texts[r]):], text
                    info = None
                    if observer is not None and observer.last is not None:
                        info = top_info(observer.last[r], token, row.top_logprobs, lambda t: tokenizer.decode([t]))
                    row.push(piece, info)

            def end(self) -> None:
                pass

        class RowsDone(StoppingCriteria):
            def __call__(self, ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
                return torch.tensor([row.done for row in rows], dtype=torch.bool, device=ids.device)

        sampled = sampling.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_new_tokens, do_sample=sampled, pad_token_id=pad_id, eos_token_id=eos_ids,
            streamer=Rows(), stopping_criteria=StoppingCriteriaList([RowsDone()]),
            logits_processor=LogitsProcessorList([observer]) if observer else None, repetition_penalty=1.0,
            temperature=sampling.temperature if sampled else None, top_p=sampling.top_p if sampled else None,
            top_k=0 if sampled else None,
        )
        if sampled:
            torch.manual_seed(sampling.seed if sampling.seed is not None else random.randrange(2**31))
        model = self.runner(sampling.strength is not None, sampling.strength)
        device = getattr(self.model, "device", torch.device("cpu"))
        with torch.inference_mode(), self._generation():
            model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)


def set_torch_threads(threads: int | None) -> None:
    """torch's intra-op threads (``None``: leave torch's choice)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
