"""The plan file `ragctl allocate` writes and `serve` / `eval run` apply (`--plan PLAN.yaml`).

    version: 1
    created_at: 2025-01-01T12:00:00+0000
    machine: {cpu_count: 2, model: ..., dataset: squad, engine: in-process, engines: 1}
    settings:                      # ragctl Settings overrides (validated on load)
      embed_batch_size: 4
      embed_batch_wait_ms: 12.5
      search_batch_size: 8
      search_batch_wait_ms: 20.0
      retrieval_threads: 1
      max_num_seqs: 8
    concurrency: 6                 # queries in flight the plan is sized for
    predicted_throughput_qps: 0.42
    predicted_latency_s: 14.1
    bottleneck: map
    mix: {...}                     # visits and presence per component, configurations seen
    solution: {...}                # the MILP's full solution
    curves: [...]                  # measured points and fits

Only `settings` and `concurrency` change behaviour; the rest documents where the plan came
from. `load_plan(path).apply(settings)` gives the settings with the plan's overrides.

Batch waits. A batch worker that gets fewer than b requests waits at most `*_batch_wait_ms` for
more. At the planned throughput, requests to a component with `visits` per query arrive every
`1 / (visits * T)` seconds, so a batch of b fills in `(b - 1) / (visits * T)`: waiting longer
adds latency without filling the batch further, and waiting much less runs batches smaller than
planned. Below the planned load a batch may never fill, so the wait is capped at
`MAX_BATCH_WAIT_MS` (the latency a request may lose to batching when traffic is light); b = 1
never waits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, ValidationError, create_model

from ragctl.allocation.curves import CPU_COMPONENTS, Curve
from ragctl.allocation.milp import Solution
from ragctl.errors import DataNotFound, InvalidRequest

PLAN_VERSION = 1
MAX_BATCH_WAIT_MS = 20.0
PLAN_SETTINGS = (
    "embed_batch_size",
    "embed_batch_wait_ms",
    "search_batch_size",
    "search_batch_wait_ms",
    "retrieval_threads",
    "max_num_seqs",
    "engine_max_num_seqs",
    "profiler_engine",
    "synthesis_engines",
)
"""The Settings fields `allocate` writes (a hand-edited plan may set any Settings field); the
last three only for several engines (`--engines N`), engine i of the plan being engine i of the
pool (`--engine-url` order)."""
TOP_KEYS = {
    "version", "created_at", "machine", "settings", "concurrency", "predicted_throughput_qps",
    "predicted_latency_s", "bottleneck", "mix", "solution", "curves", "notes",
}  # fmt: skip


def batch_wait_ms(batch: int, visits: float, throughput_qps: float) -> float:
    """How long a batch of `batch` waits to fill at the planned throughput (module docstring),
    in ms, capped at MAX_BATCH_WAIT_MS; 0 for a batch of one."""
    if batch <= 1:
        return 0.0
    rate = visits * throughput_qps
    if rate <= 0:
        return MAX_BATCH_WAIT_MS
    return round(min(MAX_BATCH_WAIT_MS, 1000.0 * (batch - 1) / rate), 3)


def query_latency_s(
    solution: Solution, visits: Mapping[str, float], presence: Mapping[str, float]
) -> float:
    """Predicted seconds per query at the plan: retrieval (embed, then search, each with its
    batch wait) runs beside the profiler call, then the synthesis stages one after another, each
    weighted by the share of queries that run it (`presence`). A stage takes its engine's batch
    latency, once per round of max_num_seqs calls when a query makes more calls than that (9
    mappers at max_num_seqs 8: two rounds' worth, 9/8)."""
    retrieval = 0.0
    for name in CPU_COMPONENTS:
        ch = solution.cpu.get(name)
        if ch is not None:
            wait = batch_wait_ms(ch.batch, visits.get(name, 1.0), solution.throughput_qps)
            retrieval += ch.latency_s + wait / 1000
    profile = solution.engine_latency_s.get("profile", 0.0) * min(1.0, presence.get("profile", 1))
    seqs = {name: e.max_num_seqs for e in solution.engines for name in e.components}
    synthesis = 0.0
    for name, s in solution.engine_latency_s.items():
        share = presence.get(name, 0.0)
        if name == "profile" or share <= 0:
            continue
        calls = visits.get(name, share) / share  # calls per query that runs the stage
        synthesis += share * s * max(1.0, calls / seqs[name])
    return max(retrieval, profile) + synthesis


def plan_settings(solution: Solution, visits: Mapping[str, float]) -> dict[str, Any]:
    """The Settings overrides of a solution: batch sizes and waits of embedding and search,
    their thread count, and the (synthesis) engine's max concurrent sequences."""
    out: dict[str, Any] = {}
    for name in CPU_COMPONENTS:
        ch = solution.cpu.get(name)
        if ch is None:
            continue
        out[f"{name}_batch_size"] = ch.batch
        out[f"{name}_batch_wait_ms"] = batch_wait_ms(
            ch.batch, visits.get(name, 1.0), solution.throughput_qps
        )
    threads = [solution.cpu[n].threads for n in CPU_COMPONENTS if n in solution.cpu]
    if threads:
        # One setting for both: the MILP is told to give them one thread count.
        out["retrieval_threads"] = max(threads)
    if solution.engines:
        # The serving engine runs synthesis; with several engines, the one that does.
        synth = [e for e in solution.engines if set(e.components) - {"profile"}]
        out["max_num_seqs"] = (synth or list(solution.engines))[0].max_num_seqs
    if len(solution.engines) > 1:
        # Several engines: each engine's sequences, the profiler's engine, and the engines
        # synthesis plans are placed on (a plan's calls go to one of them).
        out["engine_max_num_seqs"] = ",".join(str(e.max_num_seqs) for e in solution.engines)
        if "profile" in solution.assignment:
            out["profiler_engine"] = int(solution.assignment["profile"])
        synth_ix = [i for i, e in enumerate(solution.engines) if set(e.components) - {"profile"}]
        if synth_ix and len(synth_ix) < len(solution.engines):
            out["synthesis_engines"] = ",".join(map(str, synth_ix))
    return out


def plan_concurrency(
    solution: Solution, visits: Mapping[str, float], presence: Mapping[str, float]
) -> int:
    """Queries in flight the plan is sized for: Little's law, planned throughput x predicted
    latency per query, rounded up (at least 1)."""
    latency = query_latency_s(solution, visits, presence)
    return max(1, math.ceil(solution.throughput_qps * latency - 1e-9))


@dataclass(frozen=True)
class PlanFile:
    path: Path
    settings: Mapping[str, Any]
    """The raw `settings:` mapping (see `settings_overrides` for the validated values)."""
    concurrency: int | None = None
    predicted_throughput_qps: float | None = None
    bottleneck: str | None = None
    machine: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)
    """The whole file."""

    def settings_overrides(self) -> dict[str, Any]:
        """The plan's Settings overrides, validated against `Settings`: an unknown key or a bad
        value raises `InvalidRequest` naming the file and the key."""
        from ragctl.settings import Settings

        fields = Settings.model_fields
        for key in self.settings:
            if key not in fields:
                raise InvalidRequest(
                    f"{self.path}: settings.{key} is not a ragctl setting "
                    f"(a plan sets e.g. {', '.join(PLAN_SETTINGS)})"
                )
        # A model of just these fields: validates them as Settings does, without reading
        # the environment (an env problem is not the plan's).
        model = create_model(  # type: ignore[call-overload]
            "PlanSettings",
            __config__=ConfigDict(extra="forbid"),
            **{k: (fields[k].annotation, fields[k]) for k in self.settings},
        )
        try:
            checked = model.model_validate(dict(self.settings))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidRequest(
                f"{self.path}: settings.{where}: {first['msg']} (got {first.get('input')!r})"
            ) from None
        return {key: getattr(checked, key) for key in self.settings}

    def apply(self, settings: Any) -> Any:
        """`settings` (a `ragctl.Settings`) with the plan's overrides in place."""
        return settings.model_copy(update=self.settings_overrides())

    def warnings(self, *, cpu_count: int | None = None, dataset: str | None = None) -> list[str]:
        """Where this machine or run differs from the one the plan was made for."""
        out = []
        planned = self.machine.get("cpu_count")
        if cpu_count is not None and planned is not None and planned != cpu_count:
            out.append(f"{self.path} was planned for {planned} CPUs; this machine has {cpu_count}")
        planned_ds = self.machine.get("dataset")
        if dataset is not None and planned_ds is not None and planned_ds != dataset:
            out.append(f"{self.path} was planned on dataset {planned_ds}, not {dataset}")
        return out


def write_plan(
    path: Path,
    *,
    solution: Solution,
    curves: Sequence[Curve],
    visits: Mapping[str, float],
    presence: Mapping[str, float],
    machine: Mapping[str, Any],
    mix: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Write the plan file for `solution` and return what was written."""
    doc: dict[str, Any] = {
        "version": PLAN_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": dict(machine),
        "settings": plan_settings(solution, visits),
        "concurrency": plan_concurrency(solution, visits, presence),
        "predicted_throughput_qps": round(solution.throughput_qps, 6),
        "predicted_latency_s": round(query_latency_s(solution, visits, presence), 4),
        "bottleneck": solution.bottleneck,
        "mix": {
            "visits": dict(visits),
            "presence": dict(presence),
            **(dict(mix) if mix else {}),
        },
        "solution": solution.to_dict(),
        "curves": [c.to_dict() for c in curves],
    }
    if notes:
        doc["notes"] = list(notes)
    doc = _plain(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# ragctl allocation plan: `ragctl serve --plan` / `ragctl eval run --plan` apply it\n"
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False, width=100))
    return doc


def load_plan(path: Path | str) -> PlanFile:
    """Read and check a plan file: `DataNotFound` when it is missing, `InvalidRequest` (naming
    the file and the key) when it is not a plan or a setting is unknown or out of range."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFound(f"plan file {path} not found (write one with `ragctl allocate`)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InvalidRequest(f"{path}{where}: not YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"{path}: cannot read the plan: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest(f"{path}: a plan is a YAML mapping with a `settings:` mapping")
    unknown = sorted(set(doc) - TOP_KEYS)
    if unknown:
        raise InvalidRequest(f"{path}: unknown key {unknown[0]!r} (a plan has {sorted(TOP_KEYS)})")
    version = doc.get("version", PLAN_VERSION)
    if version != PLAN_VERSION:
        raise InvalidRequest(f"{path}: plan version {version!r}; this ragctl reads {PLAN_VERSION}")
    settings = doc.get("settings")
    if not isinstance(settings, dict):
        raise InvalidRequest(f"{path}: `settings:` must be a mapping of ragctl settings")
    conc = doc.get("concurrency")
    if conc is not None and (isinstance(conc, bool) or not isinstance(conc, int) or conc < 1):
        raise InvalidRequest(f"{path}: concurrency must be an integer >= 1, got {conc!r}")
    tput = doc.get("predicted_throughput_qps")
    machine = doc.get("machine") or {}
    if not isinstance(machine, dict):
        raise InvalidRequest(f"{path}: `machine:` must be a mapping")
    plan = PlanFile(
        path=path,
        settings=settings,
        concurrency=conc,
        predicted_throughput_qps=float(tput) if isinstance(tput, int | float) else None,
        bottleneck=doc.get("bottleneck"),
        machine=machine,
        raw=doc,
    )
    plan.settings_overrides()  # fail on load, not when the plan is applied
    return plan


def _plain(x: Any) -> Any:
    """Plain Python for yaml.safe_dump: tuples to lists, numpy scalars to numbers."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, str | bytes):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
