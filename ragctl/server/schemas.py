"""The server's request bodies (OpenAI's shapes plus ragctl's options) and the model names it
serves. Unknown fields are accepted and ignored, as OpenAI-compatible servers do, so any client
library's extras pass through. Sampling fields (`max_tokens` / `max_completion_tokens`,
`temperature`, `top_p`, `stop`, `seed`, and vLLM's `ignore_eos`) apply to the final stage's
calls (`AnswerOptions`); a `max_tokens` above the collection's answer budget gets that budget,
because the KV plan is sized from it (the response's `ragctl.max_tokens` says what applied,
`finish_reason` is `length` when it cut the answer). Fields that would change the response's
shape (`n` > 1, `echo`) are refused."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ragctl.errors import InvalidRequest, ModelNotFound
from ragctl.synthesis import registry
from ragctl.synthesis.registry import MAX_CHUNKS
from ragctl.types import METHODS, AnswerOptions, Config, Message, Objective

MODEL_PREFIX = "ragctl/"
AUTO_MODEL = "ragctl/auto"
MethodName = Annotated[
    str,
    AfterValidator(registry.known),
    Field(json_schema_extra=lambda schema: schema.update(enum=list(METHODS))),
]


def served_models() -> list[str]:
    """`ragctl/auto` (adaptive) and one fixed model per synthesis method."""
    return [AUTO_MODEL, *(MODEL_PREFIX + m for m in METHODS)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class StreamOptions(_Open):
    include_usage: bool = False


class RagctlOptions(_Open):
    """ragctl's own request fields (OpenAI clients send them with `extra_body`)."""

    collection: str | None = Field(
        None, min_length=1, description="Collection (index) to answer from; default: the server's."
    )
    method: MethodName | None = Field(
        None, description="Fix the synthesis method (turns `ragctl/auto` into a fixed model)."
    )
    num_chunks: int | None = Field(None, ge=1, le=MAX_CHUNKS, description="Fixed chunk count.")
    intermediate_length: int | None = Field(
        None, ge=1, le=1000, description="map_reduce: summary budget per chunk, in tokens."
    )
    max_chunks: int | None = Field(
        None, ge=1, le=MAX_CHUNKS, description="Adaptive: never use more chunks than this."
    )
    # Finite: JSON's 1e999 parses as infinity, which no response could echo back.
    slo_ms: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Latency SLO in ms: the SLO loop flags, prioritises and (model ragctl/auto) "
        "plans a cheaper configuration to meet it; the response's ragctl.decision.slo says how.",
    )
    deadline_ms: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Give up after this many ms: 504, and the engine calls stop.",
    )
    objective: Objective | None = Field(
        None,
        description="Adaptive: how best-fit chooses among the configurations that fit (quality: "
        "the largest; balanced; latency: the fastest predicted); default: the server's.",
    )

    def config(self, model: str) -> Config | None:
        """The fixed configuration this request asks for; None: adaptive."""
        if model not in served_models():
            raise ModelNotFound(
                f"the model {model!r} does not exist; this server serves "
                + ", ".join(served_models())
            )
        method = self.method or (None if model == AUTO_MODEL else model[len(MODEL_PREFIX) :])
        if method is None:
            if self.num_chunks is not None or self.intermediate_length is not None:
                raise InvalidRequest(
                    "num_chunks and intermediate_length fix a configuration: name the method "
                    "too (model ragctl/<method> or the `method` field)"
                )
            return None
        try:  # the method's defaults where the request names no num_chunks/intermediate_length
            return registry.spec(method).fixed_config(self.num_chunks, self.intermediate_length)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None


class Sampling(RagctlOptions):
    """The fields chat and completions share; OpenAI's sampling fields apply to the final
    stage (see the module notes)."""

    model: str = Field(..., min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = (
        None
    )
    seed: int | None = None
    ignore_eos: bool = Field(
        False, description="vLLM's extension: generate exactly max_tokens (benchmarks)."
    )

    def answer_budget(self) -> int | None:
        return self.max_tokens

    def options(self) -> AnswerOptions:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return AnswerOptions(
            max_tokens=self.answer_budget(),
            temperature=self.temperature,
            top_p=self.top_p,
            stop=tuple(s for s in stop if s),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            objective=self.objective,
        )


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    n: int = Field(1, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    user: str | None = None

    def answer_budget(self) -> int | None:
        # OpenAI's newer name wins, as it does there.
        return self.max_completion_tokens or self.max_tokens

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.n != 1:
            raise ValueError("n > 1 is not supported: ragctl returns one answer per request")
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's question")
        return self

    def question(self) -> str:
        return self.messages[-1].text()

    def history(self) -> tuple[Message, ...]:
        """Earlier user/assistant/system turns (tool messages are not carried)."""
        out = []
        for m in self.messages[:-1]:
            role = "system" if m.role == "developer" else m.role
            if role in ("system", "user", "assistant") and m.text().strip():
                out.append(Message(role, m.text()))  # type: ignore[arg-type]
        return tuple(out)


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=64)]
    n: int = Field(1, ge=1, le=1)
    echo: bool = False
    user: str | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def openai_error(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
