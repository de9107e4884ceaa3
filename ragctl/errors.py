"""One error tree for ragctl.

`RagctlError` is the root. Its two branches split blame the way users need it:

- `UserError`: you asked wrongly (unknown dataset, empty question, bad config, prompt too long,
  missing optional dependency). Retrying the same thing fails the same way.
- `RuntimeFailure`: it failed while running (engine unreachable, timed out, died mid-request).
  Retrying may work.

Each error has a short machine `code` and the HTTP status a server should answer with; the CLI
prints `str(error)` as one line and exits non-zero.
"""

from __future__ import annotations


class RagctlError(Exception):
    code = "ragctl_error"
    http_status = 500


class UserError(RagctlError):
    code = "invalid_request"
    http_status = 400


class InvalidRequest(UserError):
    code = "invalid_request"


class InvalidSetting(UserError):
    """A setting (flag, environment variable or override) has an unknown name or a bad value."""

    code = "invalid_setting"


class UnknownDataset(UserError):
    code = "unknown_collection"
    http_status = 404


class DataNotFound(UserError):
    code = "data_not_found"
    http_status = 404


class DataFormatError(DataNotFound):
    """A data file exists but a row is malformed (bad JSON, missing or mistyped field)."""

    code = "data_malformed"
    http_status = 422


class PromptTooLong(UserError):
    code = "context_length_exceeded"
    http_status = 413


class ExceedsKVCache(PromptTooLong):
    """Even the smallest configuration needs more KV blocks than the engine has in total."""

    code = "kv_cache_exceeded"


class RulesError(UserError):
    """A rules file is missing, not YAML, or does not match the rules schema (the message
    names the file, line and field)."""

    code = "invalid_rules"


class ProfilerStateError(UserError):
    """A profiler state file (calibration.json, learned.json, labels.jsonl) is not JSON, is of
    another format or version, or lacks a field; the message is one line naming the file and
    what is wrong. Delete or refit the file (it is derived from outcome labels)."""

    code = "invalid_profiler_state"
    http_status = 500


class MissingDependency(UserError):
    code = "missing_dependency"
    http_status = 500


class ModelNotFound(UserError):
    code = "model_not_found"
    http_status = 404


class RuntimeFailure(RagctlError):
    code = "runtime_error"
    http_status = 500


class ModelPreparationError(RuntimeFailure):
    code = "model_preparation_failed"


class EngineError(RuntimeFailure):
    """The LLM engine failed a call."""

    code = "engine_error"
    http_status = 502


class EngineUnavailable(EngineError):
    """The engine cannot be reached or has died."""

    code = "engine_unavailable"
    http_status = 502


class EngineUnreachable(EngineUnavailable):
    """The engine could not be reached at all (connection refused or connect timeout): the
    call never started, so it is safe to run it on another engine of the pool."""


class MetricsError(EngineError):
    """The server's /metrics lacks what ragctl needs (or is not Prometheus text)."""

    code = "engine_metrics"


class EngineTimeout(EngineError):
    code = "engine_timeout"
    http_status = 504


class EmbeddingError(RuntimeFailure):
    """An embedding backend (local model or remote API) failed."""

    code = "embedding_error"
    http_status = 502


class QueueFull(RuntimeFailure):
    """The admission queue is full: the request was not accepted (retry later)."""

    code = "queue_full"
    http_status = 503


class ProfilerError(RuntimeFailure):
    """The profiler LLM gave no usable profile (timeout, engine error, out-of-range values).
    The controller never lets it fail a request: it falls back and counts it."""

    code = "profiler_error"
    http_status = 502


class Unauthorized(UserError):
    """Missing or wrong API key."""

    code = "invalid_api_key"
    http_status = 401


class RequestTooLarge(UserError):
    """The request body is larger than the server accepts."""

    code = "request_too_large"
    http_status = 413


class TooManyRequests(RuntimeFailure):
    """The server is answering as many requests as it allows at once (retry later)."""

    code = "rate_limit_exceeded"
    http_status = 429


class DeadlineExceeded(RuntimeFailure):
    """The request's own deadline passed before its answer; its engine calls were stopped."""

    code = "deadline_exceeded"
    http_status = 504


class SLOUnmeetable(RuntimeFailure):
    """Refused at admission by SLO shedding: even the fastest configuration that fits is
    predicted to miss the request's SLO (`scheduler.slo`, mitigation `shed`). Nothing ran; a
    retry is a new request with a new deadline, so servers tell clients not to retry it blindly."""

    code = "slo_unmeetable"
    http_status = 503
