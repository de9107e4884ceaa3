"""The serving model's tokenizer: chunk sizes and prompt token counts are measured with it, so
what ragctl predicts is what the engine will see."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from ragctl.errors import ModelNotFound
from ragctl.types import GenerationRequest, Message


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, name: str) -> None:
        self.hf = hf_tokenizer
        """The underlying transformers tokenizer (langchain's splitters take it directly)."""
        self.name = name

    @classmethod
    def load(cls, name_or_path: str) -> Tokenizer:
        return _load(name_or_path)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def count_many(self, texts: Sequence[str]) -> list[int]:
        """Token counts of several texts in one batched call (faster than one by one)."""
        if not texts:
            return []
        ids = self.hf(list(texts), add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    def render_chat(self, messages: Sequence[Message]) -> str:
        """The prompt text the model sees for these messages (its chat template, ready for the
        assistant's turn)."""
        turns = [{"role": m.role, "content": m.content} for m in messages]
        if getattr(self.hf, "chat_template", None):
            return self.hf.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        # A base model without a template: a plain transcript.
        return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        # The rendered template already carries the special tokens.
        return self.encode(self.render_chat(messages))

    def count_chat(self, messages: Sequence[Message]) -> int:
        return len(self.encode_chat(messages))

    def encode_request(self, request: GenerationRequest) -> list[int]:
        """The token ids the engine sees for a call: its rendered chat, or its raw prompt with
        the tokenizer's own special tokens (as vLLM's completions endpoint adds them)."""
        if request.prompt is not None:
            return list(self.hf.encode(request.prompt))
        return self.encode_chat(request.messages)


@lru_cache(maxsize=8)
def _load(name_or_path: str) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"cannot load a tokenizer from {name_or_path!r}: {e}") from e
    return Tokenizer(hf, name_or_path)
