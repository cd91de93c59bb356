"""The OpenAI request bodies ``detox serve`` accepts, as pydantic models (strict types: ``"10"`` is not a number).

Fields OpenAI defines that this server does not implement are accepted only at their no-op values (e.g.
``frequency_penalty: 0``), so a client is told instead of silently getting something else. Unknown fields are
ignored, as OpenAI-compatible servers commonly do (clients add their own, e.g. ``user``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class DetoxOptions(BaseModel):
    """Per-request fusion settings: ``{"strength": 4}`` or ``{"enabled": false}`` (the unfused model)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool = True
    strength: float | None = Field(default=None, ge=0)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    detox: DetoxOptions = Field(default_factory=DetoxOptions)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    # OpenAI's fields this server does not implement, and the no-op values it accepts for them
    _no_ops: ClassVar[dict[str, tuple[Any, ...]]] = {"frequency_penalty": (0,), "presence_penalty": (0,),
                                                     "logit_bias": (None, {})}

    @model_validator(mode="after")
    def _unsupported(self) -> "_Common":
        for name, no_ops in self._no_ops.items():
            if getattr(self, name) not in no_ops:
                raise ValueError(f"{name} is not supported by this server (leave it out)")
        return self


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    _no_ops: ClassVar = {**_Common._no_ops, "echo": (False,), "suffix": (None, ""), "best_of": (None, 1)}

    @model_validator(mode="after")
    def _one_prompt(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("send one prompt per request (a list of several prompts is not supported)")
        return self

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    _no_ops: ClassVar = {**_Common._no_ops, "tools": (None, [])}

    @model_validator(mode="after")
    def _chat_checks(self) -> "ChatRequest":
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format other than text is not supported by this server")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
