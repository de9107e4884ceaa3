"""The cost side of best-fit and the SLO loop: how long a configuration will take (`DelayModel`,
fitted online from the engine's own stage timings, load-aware) and how good it is expected to be
(`QualityModel`, from outcome labels, with a concave prior). Pure: numpy and scipy only.

- `StageWork`: one stage's calls, prompt tokens and output tokens (decode steps = the longest
  output; the calls of a stage are one batch). `WorkTable` gives any configuration's per-stage
  work from the same `CallSizer.stages` the KV memory model (`NeedTable`) sums, by prefix sums.
- `Load`: what ragctl has on the engine when a stage starts: sequences and tokens in flight
  (`LoadMeter` counts them around the synthesis calls).
- `DelayModel`: seconds of one stage as a non-negative linear function of its work and the load
  (see `FEATURES`), fitted by windowed, relative-error non-negative least squares with a weak
  prior (ridge towards prior coefficients, worth `prior_weight` observations). Nothing in it is
  tuned to a model: the prior comes from the engine's measured rates when known (`from_rates`),
  else from order-of-magnitude placeholders that only rank configurations by work.
  `draw_shares` samples each stage's output share from its posterior (Thompson sampling), so a
  chooser that predicts with the draw keeps trying a near-tied configuration whose stage it
  rarely runs instead of trusting a stale estimate for good.
- `StepCosts` (`fit_step_costs`): an engine's seconds per step as a function of the prompt and
  generated tokens in it, fitted on the steps the engine logged (`engine.base.StepLog`): what a
  prefill costs every sequence beside it, which the SLO loop's holding weighs.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import nnls

from ragctl.types import METHODS, TAKES_INTERMEDIATE, Config, ConfigSpace

if TYPE_CHECKING:  # only their attributes are read (as in `memory.NeedTable`)
    from ragctl.engine.base import EngineStep
    from ragctl.synthesis.methods import CallSizer, StageSize


@dataclass(frozen=True)
class StageWork:
    """One synthesis stage's work: its calls (submitted together, one batch), their prompt
    tokens, and their output tokens: `decode_steps` is the longest call's (the batch decodes
    until its longest sequence ends), `output_tokens` the sum over calls. Planned work carries
    the output budgets (max_tokens); observed work what was generated."""

    stage: str
    calls: int
    prompt_tokens: int
    decode_steps: int
    output_tokens: int
    width: int = 1
    """Chunks (or notes) each call reads: 1 in a per-chunk stage, n in one call over n. How
    much of its output budget a call uses can grow with what it reads (a summary of six
    passages runs longer than one of one), so `DelayModel` learns the share per width too."""
    collection: str = ""
    """Whose query this is: an engine's seconds per token are the same for every collection it
    serves, but how much of its answer budget a call uses depends on the collection's
    questions, so `DelayModel` learns output shares per collection ("": not told)."""


@dataclass(frozen=True)
class Load:
    """What else runs on the engine: sequences in flight and their tokens (prompt + output
    budget)."""

    seqs: float = 0.0
    tokens: float = 0.0


NO_LOAD = Load()


class LoadMeter:
    """ragctl's own view of the engine's load: synthesis calls in flight and their tokens.
    Assumes, like `bestfit.unshown_reserved`, that ragctl owns the engine (other clients' work
    and profiler calls are not counted: the fit absorbs a steady share of them)."""

    def __init__(self) -> None:
        self.seqs = 0
        self.tokens = 0

    def now(self) -> Load:
        return Load(float(self.seqs), float(self.tokens))

    @contextmanager
    def running(self, calls: int, tokens: int) -> Iterator[None]:
        """Count `calls` sequences of `tokens` tokens in flight while the block runs."""
        self.seqs += calls
        self.tokens += tokens
        try:
            yield
        finally:
            self.seqs -= calls
            self.tokens -= tokens


# -- per-configuration work ---------------------------------------------------------------------


class WorkTable:
    """`StageWork` (with output budgets) of any configuration of one query, in O(stages) after
    one pass per (method, intermediate_length): per-chunk stages by prefix sums (and a prefix
    max for the decode steps), a one-call stage from its call at n."""

    def __init__(self, sizer: CallSizer) -> None:
        self.sizer = sizer
        self._stages: dict[tuple[str, int | None], list[Callable[[int], StageWork]]] = {}

    def _stage(self, stage: StageSize) -> Callable[[int], StageWork]:
        if not stage.per_chunk:

            def one(n: int) -> StageWork:
                prompt, out = stage.call(n)
                return StageWork(stage.name, 1, prompt, out, out, n, self.sizer.collection)

            return one
        prompt_sum, out_sum, out_max = [0], [0], [0]
        for i in range(len(self.sizer.passages)):
            prompt, out = stage.call(i)
            prompt_sum.append(prompt_sum[-1] + prompt)
            out_sum.append(out_sum[-1] + out)
            out_max.append(max(out_max[-1], out))
        return lambda n: StageWork(
            stage.name, n, prompt_sum[n], out_max[n], out_sum[n], collection=self.sizer.collection
        )

    def __call__(self, config: Config) -> tuple[StageWork, ...]:
        n = self.sizer.chunks_used(config)
        key = (config.method, config.intermediate_length)
        if key not in self._stages:
            self._stages[key] = [self._stage(s) for s in self.sizer.stages(config)]
        return tuple(f(n) for f in self._stages[key])


# -- an engine's step costs -----------------------------------------------------------------------

MIN_STEPS = 50
MIN_PREFILL_STEPS = 10
"""`fit_step_costs` answers once this many steps were logged, this many of them with a prefill
in them (fewer cannot separate a prefill's cost from a step's)."""
OUTLIER_FACTOR = 8.0
"""A step the first fit misses by more than this many times its median miss, and by more than
its own prediction, is a pause of the process (a collection, another program on the cores),
not the work in it: the second fit leaves it out."""


@dataclass(frozen=True)
class StepCosts:
    """An engine's seconds per step, fitted from its own steps (`fit_step_costs`): `base_s`
    plus `prefill_token_s` per prompt token computed in the step plus `decode_token_s` per
    token generated in it. Every sequence in a step waits for the whole step, so a prefill of
    p tokens delays each sequence beside it by about p x `prefill_token_s`: what holding
    (`SLOTracker.hold`) weighs, measured on the engine rather than read off a per-request
    regression that cannot tell a request's own prompt from the load beside it."""

    base_s: float
    prefill_token_s: float
    decode_token_s: float
    steps: int
    """Steps the fit used."""

    def to_dict(self) -> dict[str, float | int]:
        return {
            "base_ms": round(self.base_s * 1e3, 3),
            "prefill_token_ms": round(self.prefill_token_s * 1e3, 4),
            "decode_token_ms": round(self.decode_token_s * 1e3, 4),
            "steps": self.steps,
        }


def fit_step_costs(steps: Iterable[EngineStep]) -> StepCosts | None:
    """Non-negative least squares of step seconds on (1, prefill tokens, decode tokens), once
    more without the outliers of the first fit (`OUTLIER_FACTOR`); None until `MIN_STEPS`
    steps, `MIN_PREFILL_STEPS` of them with a prefill, were seen."""
    rows = np.array(
        [(1.0, s.prefill_tokens, s.decode_tokens, s.seconds) for s in steps], dtype=float
    ).reshape(-1, 4)
    if len(rows) < MIN_STEPS or int((rows[:, 1] > 0).sum()) < MIN_PREFILL_STEPS:
        return None
    x, y = rows[:, :3], rows[:, 3]
    coef, _ = nnls(x, y)
    miss = np.abs(y - x @ coef)
    keep = (miss <= OUTLIER_FACTOR * np.median(miss)) | (miss <= x @ coef)
    if int((rows[keep, 1] > 0).sum()) >= MIN_PREFILL_STEPS:
        x, y = x[keep], y[keep]
        coef, _ = nnls(x, y)
    return StepCosts(float(coef[0]), float(coef[1]), float(coef[2]), steps=len(y))


# -- the delay model ----------------------------------------------------------------------------

FEATURES = (
    "stage",  # fixed cost per stage: scheduling, the first step, HTTP
    "prefill_token",  # prompt tokens of the stage's calls
    "decode_step",  # iterations until the longest output ends
    "decode_token",  # sequence-steps of the stage's own batch (0 where batching is free)
    "load_seq_step",  # decode steps x sequences of others in flight: steps slow with batch size
    "load_token",  # tokens of others in flight: their prefill and attention share the engine
)
"""What one stage's seconds are linear in, with non-negative coefficients (seconds per unit).
On a memory-bound GPU the batch terms are near 0 and time barely grows with size; on a
compute-bound engine they dominate."""

NEUTRAL_PREFILL_TPS = 1000.0
NEUTRAL_DECODE_TPS = 20.0
"""Order-of-magnitude placeholders for an engine nothing is known about (no measured rates):
they only rank configurations by work (a decode step costs about 50 prompt tokens) until the
engine's own observations take over; not measured on any model."""
NEUTRAL_BATCH_GROWTH = 0.5
"""Share of a decode step's cost that grows with the batch size (0: memory-bound, 1: fully
compute-bound), when unknown: the middle."""


def features(work: StageWork, load: Load = NO_LOAD) -> np.ndarray:
    return np.array(
        [
            1.0,
            work.prompt_tokens,
            work.decode_steps,
            work.output_tokens,
            work.decode_steps * load.seqs,
            load.tokens,
        ],
        dtype=float,
    )


def prior_from_rates(
    prefill_tps: float, decode_tps: float, batch_growth: float = NEUTRAL_BATCH_GROWTH
) -> np.ndarray:
    """Coefficients from an engine's prefill rate (prompt tokens/s) and single-sequence decode
    rate (tokens/s): a step of one sequence costs 1/decode_tps, of which `batch_growth` grows
    with every sequence in the batch, its own or another request's."""
    if not (prefill_tps > 0 and decode_tps > 0 and 0 <= batch_growth <= 1):
        raise ValueError("rates must be > 0 and batch_growth in [0, 1]")
    step = 1.0 / decode_tps
    return np.array(
        [0.0, 1.0 / prefill_tps, step * (1 - batch_growth), step * batch_growth,
         step * batch_growth, 0.0]
    )  # fmt: skip


NEUTRAL_PRIOR = prior_from_rates(NEUTRAL_PREFILL_TPS, NEUTRAL_DECODE_TPS)


def _reject_reason(work: StageWork, load: Load, seconds: float) -> str | None:
    if not math.isfinite(seconds) or seconds <= 0:
        return "seconds not a positive finite number"
    nums = (work.calls, work.prompt_tokens, work.decode_steps, work.output_tokens)
    if any(not math.isfinite(x) or x < 0 for x in (*nums, load.seqs, load.tokens)):
        return "negative or non-finite tokens, calls or load"
    if work.calls < 1:
        return "a stage without calls"
    return None


Shares = Mapping[tuple[str, str], float]
"""Output shares per (collection, stage), as `DelayModel.draw_shares` gives them."""


def _key(collection: str, stage: str) -> str:
    """A share's name in reports: the stage, after its collection where one was told."""
    return f"{collection}/{stage}" if collection else stage


@dataclass
class ShareAverage:
    """A running average of output shares and of their squares: the plain mean of all seen
    until 1/alpha of them, then an exponential average (one started at the first share would
    weigh that share 0.9^n, 35% after ten)."""

    mean: float = 0.0
    square: float = 0.0
    seen: int = 0

    def add(self, share: float, alpha: float) -> None:
        self.seen += 1
        a = max(alpha, 1.0 / self.seen)
        self.mean += a * (share - self.mean)
        self.square += a * (share * share - self.square)

    def error(self, alpha: float) -> float | None:
        """Standard error of the mean over the recent evidence: the spread over the effective
        count behind the average (the count seen, at most (2 - alpha) / alpha); None until two
        were seen."""
        if self.seen < 2:
            return None
        spread = max(self.square - self.mean * self.mean, 0.0) * self.seen / (self.seen - 1)
        return math.sqrt(spread / min(self.seen, (2.0 - alpha) / alpha))


class DelayModel:
    """Seconds of synthesis stages from their work and the engine's load (see the module
    docstring). One per engine: every controller on the engine feeds it and asks it.

    `observe` adds one stage as it ran (observed tokens, the load when it started, its wall
    seconds) and refits every `refit_every` accepted observations over the last `window`.
    The fit minimises relative squared error (timings are heteroscedastic: a 0.2 s stage
    matters as much as a 5 s one, and the SLO loop judges relative misses) plus the prior's
    ridge, with coefficients >= 0 (scipy's NNLS): more work never predicts less time.
    Planned work carries output budgets, but calls stop early; per collection and stage name
    (`StageWork.collection`: answers run as long as a collection's questions need; a
    collection that has not run a stage yet gets every collection's share of it), the observed
    share of the budget used (`output_share`, 1 until seen; the mean of the shares seen, then
    an exponential average with weight `share_alpha`) scales planned outputs. The same average
    of the squared shares gives their spread, and `draw_shares` samples each stage's mean share
    from a normal posterior with that spread over the effective count of shares behind it (the
    count seen, at most the average's (2 - alpha) / alpha): an estimate never gets more certain
    than its recent evidence, so a stage nobody chose lately still gets tried when it is close.
    Per stage and width (`StageWork.width`: what one call reads) the same average is kept, and
    a width's share is estimated by empirical Bayes over the stage's widths (`width_share`):
    its own mean where it strays from the widths' trend by more than its error explains, the
    trend (flat where it is within its errors) where it does not. Draws move it as they move
    the stage's share.
    `ready` says whether predictions rest on this engine's data (or measured rates), not only
    the neutral placeholders."""

    def __init__(
        self,
        prior: Sequence[float] | None = None,
        *,
        prior_measured: bool = False,
        prior_weight: float = 2.0,
        window: int = 512,
        refit_every: int = 8,
        min_observations: int = len(FEATURES) + 2,
        share_alpha: float = 0.01,
        warm: Iterable[tuple[StageWork, Load, float]] = (),
        seed: int = 0,
    ) -> None:
        """`prior`: coefficients in `FEATURES` order (default: `NEUTRAL_PRIOR`);
        `prior_measured`: it comes from this engine's measured rates, so it may be used for SLO
        predictions before any observation. `warm`: observations to start from (e.g. the
        calls `ragctl allocate` timed), fitted at once. `seed`: of `draw_shares`' generator (a
        copy of the model draws the same sequence: replays are reproducible). `share_alpha`:
        0.01, the plain mean of the first 100 shares, then a memory of ~200: one call's share
        spreads by 0.2-0.4 of its budget (one-call stages of the four datasets' grids), and
        near ties differ by a few hundredths, which ~20 shares (alpha 0.1) cannot resolve; a
        warm start's order then barely matters."""
        p = NEUTRAL_PRIOR if prior is None else np.asarray(prior, dtype=float)
        if p.shape != (len(FEATURES),) or not np.all(np.isfinite(p)) or np.any(p < 0):
            raise ValueError(f"prior must be {len(FEATURES)} finite non-negative coefficients")
        if prior_weight < 0 or window < 1 or refit_every < 1 or not 0 < share_alpha <= 1:
            raise ValueError("prior_weight >= 0, window >= 1, refit_every >= 1, 0 < alpha <= 1")
        self.prior = p
        self.prior_measured = prior_measured
        self.prior_weight = prior_weight
        self.window = window
        self.refit_every = refit_every
        self.min_observations = min_observations
        self.share_alpha = share_alpha
        self.coef = p.copy()
        self.observations = 0
        """Accepted observations, ever (the window keeps the last `window`)."""
        self.fits = 0
        self.rejected: Counter[str] = Counter()
        """Why observations were ignored (reason -> count)."""
        self._rows: deque[tuple[np.ndarray, float]] = deque(maxlen=window)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        # Output shares per (collection, stage), and per (collection, stage, width); `_pooled`
        # per stage over every collection, for a collection that has not run the stage yet.
        self._share: dict[tuple[str, str], ShareAverage] = {}
        self._width_share: dict[tuple[str, str, int], ShareAverage] = {}
        self._pooled: dict[str, ShareAverage] = {}
        # `width_share`'s estimates per (collection, stage), computed once per new share: every
        # candidate of every decision asks for them.
        self._pooled_widths: dict[tuple[str, str], dict[int, float]] = {}
        self._since_fit = 0
        self.warm_start(warm)

    def fresh(self) -> DelayModel:
        """A model with this one's prior and settings and no observations."""
        return DelayModel(
            self.prior, prior_measured=self.prior_measured, prior_weight=self.prior_weight,
            window=self.window, refit_every=self.refit_every,
            min_observations=self.min_observations, share_alpha=self.share_alpha, seed=self.seed,
        )  # fmt: skip

    @property
    def ready(self) -> bool:
        return self.prior_measured or self.observations >= self.min_observations

    @property
    def source(self) -> str:
        """`fitted` (this engine's observations), `measured` (its rates) or `prior`."""
        if self.fits and self.observations >= self.min_observations:
            return "fitted"
        return "measured" if self.prior_measured else "prior"

    def warm_start(self, observations: Iterable[tuple[StageWork, Load, float]]) -> None:
        """Add observations measured elsewhere (a profiling run) and fit at once."""
        added = sum(self._add(w, load, s) is None for w, load, s in observations)
        if added:
            self.refit()

    def observe(
        self,
        work: StageWork,
        load: Load,
        seconds: float,
        *,
        budget: StageWork | None = None,
    ) -> str | None:
        """Add one stage as it ran; None when accepted, else why it was ignored (also counted
        in `rejected`). `budget`: the same stage's planned work (its output budgets), to learn
        how much of the budget this stage's calls use."""
        reason = self._add(work, load, seconds)
        if reason is not None:
            return reason
        if budget is not None and budget.output_tokens > 0:
            share = min(work.output_tokens / budget.output_tokens, 1.0)
            c = budget.collection
            for avg in (
                self._share.setdefault((c, work.stage), ShareAverage()),
                self._width_share.setdefault((c, work.stage, budget.width), ShareAverage()),
                self._pooled.setdefault(work.stage, ShareAverage()),
            ):
                avg.add(share, self.share_alpha)
            self._pooled_widths.pop((c, work.stage), None)
        self._since_fit += 1
        if self._since_fit >= self.refit_every or self.observations == self.min_observations:
            self.refit()
        return None

    def _add(self, work: StageWork, load: Load, seconds: float) -> str | None:
        reason = _reject_reason(work, load, seconds)
        if reason is not None:
            self.rejected[reason] += 1
            return reason
        self._rows.append((features(work, load), float(seconds)))
        self.observations += 1
        return None

    def refit(self) -> None:
        """Fit the coefficients over the window (see the class docstring)."""
        self._since_fit = 0
        if not self._rows:
            return
        X = np.array([r for r, _ in self._rows])
        y = np.array([s for _, s in self._rows])
        # Relative error: each row divided by its own seconds.
        Xw = X / y[:, None]
        yw = np.ones_like(y)
        # The prior as ridge rows, each worth `prior_weight` typical observations of its
        # feature (its RMS in the window); a feature never seen keeps its prior exactly.
        scale = np.sqrt(np.mean(Xw**2, axis=0))
        seen = scale > 0
        scale[~seen] = scale[seen].mean() if seen.any() else 1.0
        ridge = math.sqrt(self.prior_weight) * np.diag(scale)
        if self.prior_weight == 0:
            unseen = np.flatnonzero(~seen)
            ridge[unseen, unseen] = scale[unseen]  # still pin unseen features to the prior
        A = np.vstack([Xw, ridge])
        b = np.concatenate([yw, ridge @ self.prior])
        # Column scaling for conditioning (tokens are ~1e3, the constant 1): solve for c*s.
        col = np.linalg.norm(A, axis=0)
        col[col == 0] = 1.0
        sol, _ = nnls(A / col, b, maxiter=50 * A.shape[1])
        self.coef = sol / col
        self.fits += 1

    def _stage_share(self, stage: str, collection: str) -> ShareAverage | None:
        """The collection's average for the stage, else every collection's (None: unseen)."""
        own = self._share.get((collection, stage))
        return own if own is not None else self._pooled.get(stage)

    def output_share(self, stage: str, width: int | None = None, collection: str = "") -> float:
        """Observed share of a stage's output budget its calls use in `collection` (1 until
        seen; every collection's until the collection's own is seen); with `width`, that of
        calls reading `width` chunks (`width_share`, else the stage's)."""
        by_width = None if width is None else self.width_share(stage, width, collection)
        if by_width is not None:
            return by_width
        seen = self._stage_share(stage, collection)
        return seen.mean if seen is not None else 1.0

    def share_error(self, stage: str, collection: str = "") -> float | None:
        """Standard error of a stage's mean output share (see the class docstring); None until
        two shares were seen."""
        seen = self._stage_share(stage, collection)
        return None if seen is None else seen.error(self.share_alpha)

    def width_share(self, stage: str, width: int, collection: str = "") -> float | None:
        """The share of `stage`'s calls that read `width` chunks in `collection`
        (`_pool_widths`); None for a width seen fewer than twice, or the only one."""
        key = (collection, stage)
        if key not in self._pooled_widths:
            self._pooled_widths[key] = self._pool_widths(stage, collection)
        return self._pooled_widths[key].get(width)

    def _pool_widths(self, stage: str, collection: str) -> dict[int, float]:
        """Every width's share of one stage, by empirical Bayes over the stage's widths seen at
        least twice (Fay-Herriot, with the trend shrunk too): a prior line through the widths'
        means against log width (answers may run longer the more they read, and flatten), its
        slope kept in the proportion 1 - se^2 / slope^2 (none where it is within its error; a
        line needs three widths), then each width's difference from the line kept in the
        proportion tau^2 / (tau^2 + its error^2), where tau^2 (how far widths truly stray from
        the line) is the residuals' variance less their mean squared error. Widths that differ
        within their errors share one estimate; a trend beyond its error is followed to the
        widths at its ends, rather than pulling them to the middle. Empty below two widths."""
        rows = {
            w: (avg.mean, error)
            for (c, s, w), avg in self._width_share.items()
            if (c, s) == (collection, stage) and (error := avg.error(self.share_alpha)) is not None
        }
        if len(rows) < 2:
            return {}
        x = np.log(np.array(list(rows), dtype=float))
        means = np.array([m for m, _ in rows.values()])
        errors = np.array([e for _, e in rows.values()])
        dx = x - x.mean()
        sxx = float(np.sum(dx * dx))
        slope, params = 0.0, 1  # the line's fitted parameters: its level, and its slope if kept
        if len(rows) > 2 and sxx > 0:
            raw = float(np.sum(dx * (means - means.mean()))) / sxx
            se2 = float(np.sum(dx * dx * errors * errors)) / (sxx * sxx)
            if raw * raw > se2:
                slope, params = raw * (1.0 - se2 / (raw * raw)), 2
        line = means.mean() + slope * dx
        dof = len(rows) - params
        tau2 = max(float(np.sum((means - line) ** 2)) / dof - float(np.mean(errors**2)), 0.0)
        errors2 = errors * errors
        keep = np.divide(tau2, tau2 + errors2, out=np.ones_like(errors2), where=tau2 + errors2 > 0)
        return dict(zip(rows, map(float, line + (means - line) * keep), strict=True))

    def width_offset(self, stage: str, width: int, collection: str = "") -> float:
        """`width_share` less the stage's share (0 where there is none): what a call's width
        moves its stage's share, estimated or drawn, by."""
        share = self.width_share(stage, width, collection)
        return 0.0 if share is None else share - self.output_share(stage, collection=collection)

    def draw_shares(self) -> dict[tuple[str, str], float]:
        """One draw of every (collection, stage)'s mean output share from its posterior (in
        [0, 1]), to pass to `predict` as `shares`; those seen fewer than twice keep their
        estimate. A width's offset (`width_offset`) applies to the draw as to the estimate."""
        out = {}
        for key, avg in sorted(self._share.items()):
            error = avg.error(self.share_alpha)
            drawn = avg.mean if error is None else self.rng.normal(avg.mean, error)
            out[key] = float(np.clip(drawn, 0.0, 1.0))
        return out

    def expected(self, work: StageWork, shares: Shares | None = None) -> StageWork:
        """Planned work (output budgets) as it is expected to run (`shares`: per (collection,
        stage), in place of the estimated output shares, e.g. a `draw_shares`; the width's
        offset applies to either)."""
        c = work.collection
        base = self.output_share(work.stage, collection=c)
        if shares is not None:
            base = shares.get((c, work.stage), base)
        share = min(max(base + self.width_offset(work.stage, work.width, c), 0.0), 1.0)
        if share >= 1.0:
            return work
        return replace(
            work,
            decode_steps=round(work.decode_steps * share),
            output_tokens=round(work.output_tokens * share),
        )

    def predict_stage(
        self, work: StageWork, load: Load = NO_LOAD, shares: Shares | None = None
    ) -> float:
        """Seconds of one stage of planned work under `load`."""
        return max(float(features(self.expected(work, shares), load) @ self.coef), 0.0)

    def prefill_s(self, work: StageWork) -> float:
        """Seconds the prefill of `work`'s prompts costs: by this model, what its calls add to
        every sequence in flight beside them (the engine's steps wait for a prefill, whoever
        they run for)."""
        return float(self.coef[FEATURES.index("prefill_token")] * work.prompt_tokens)

    def predict(
        self,
        works: Sequence[StageWork],
        load: Load = NO_LOAD,
        shares: Shares | None = None,
    ) -> float:
        """Seconds of all stages (they run one after another)."""
        return sum(self.predict_stage(w, load, shares) for w in works)

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "observations": self.observations,
            "fits": self.fits,
            "coefficients": dict(zip(FEATURES, map(float, self.coef), strict=True)),
            "output_share": {_key(c, s): avg.mean for (c, s), avg in self._share.items()},
            "output_share_error": {_key(c, s): self.share_error(s, c) for c, s in self._share},
            "output_share_by_width": {
                f"{_key(c, s)}@{w}": self.output_share(s, w, c)
                for c, s, w in sorted(self._width_share)
            },
            "rejected": dict(self.rejected),
        }


# -- the quality model --------------------------------------------------------------------------


def prior_quality(num_chunks: int, scale: float) -> float:
    """The share of queries a configuration over `num_chunks` chunks answers, before any
    outcome is known: 1 - exp(-k / scale), non-decreasing and concave in k (each extra chunk
    is less likely to hold what was missing). `scale` is the chunk count that reaches 63%:
    best-fit passes the space's lowest chunk count (the rules set it to the profile's pieces
    of information), so the space's [n, 3n] range runs from 63% to 95%."""
    return 1.0 - math.exp(-num_chunks / max(scale, 1e-9))


def covers(config: Config, label: Config) -> bool:
    """Whether `config` is at least as good as the query's label (the cheapest configuration
    that agreed with the golden answer): a method at least as rich (METHODS order: reading
    chunks together >= one by one), at least as many chunks, and for two map_reduce-like
    configurations at least the label's summary budget. An assumption, not a measurement:
    more of the same context does not hurt."""
    if METHODS.index(config.method) < METHODS.index(label.method):
        return False
    if config.num_chunks < label.num_chunks:
        return False
    if config.method in TAKES_INTERMEDIATE and label.method in TAKES_INTERMEDIATE:
        return (config.intermediate_length or 0) >= (label.intermediate_length or 0)
    return True


LABEL_SPACE_MIN = 10
"""Labels a collection needs before they, not the recent confident spaces or the rules' default,
give the space of a query with no trusted profile (`QualityModel.label_space`)."""


DEFAULT_PRIOR_STRENGTH = 5.0
"""The pooling weight, in trials, where the labels cannot estimate one (fewer than two
configurations tried, or all agreeing alike) and for the covers estimate."""
FULL_POOLING = 1e6
"""The weight that makes every measured configuration predict the pooled rate."""


def fit_strength(measured: Sequence[tuple[int, int]], default: float) -> float:
    """Empirical Bayes (beta-binomial, method of moments) over (agreed, tried) per
    configuration: the spread of their agreement rates beyond the spread their trials alone
    would give (binomial sampling around the pooled rate p) is the configurations' real
    difference tau^2, and the pooled rate then weighs p(1 - p) / tau^2 - 1 trials. No spread
    beyond sampling: `FULL_POOLING`. `default` with fewer than two configurations or p in
    {0, 1}. The trials of one label are paired (the same query), which only makes sampling
    spread look larger than it is: the estimate errs towards pooling, never towards buying a
    configuration on noise."""
    tried = [(a, n) for a, n in measured if n > 0]
    total = sum(n for _, n in tried)
    if len(tried) < 2 or not total:
        return default
    p = sum(a for a, _ in tried) / total
    if p <= 0.0 or p >= 1.0:
        return default
    rates = np.array([a / n for a, n in tried])
    sampling = p * (1 - p) * float(np.mean([1 / n for _, n in tried]))
    between = float(rates.var(ddof=1)) - sampling
    if between <= 0:
        return FULL_POOLING
    return min(max(p * (1 - p) / between - 1, 0.0), FULL_POOLING)


class QualityModel:
    """Predicted quality of a configuration in one collection: the share of labelled queries
    it answers, from two kinds of evidence (the controller feeds labels with `add_label` as
    outcome feedback produces them):

    - what was measured: a label that says which configurations were tried and which agreed
      gives each tried configuration its agreement rate, shrunk towards the pooled rate of
      every tried configuration with the weight of `strength()` trials (partial pooling: a
      difference between two configurations counts only as far as their trials carry it).
      The weight is estimated from the labels themselves (empirical Bayes, `fit_strength`):
      configurations whose rates differ no more than their trials' sampling would make them
      are pooled fully, so a few labels' noise never buys a larger configuration.
      A configuration never tried takes the estimates of its family (method and summary
      budget; of the nearest summary budget tried when its own was not) interpolated by chunk
      count (the nearest one beyond the tried range), and a method never tried the pooled
      rate. Nothing assumes that more chunks help: where they measurably do not, or hurt (a
      model that a long context distracts), the prediction says so.
    - labels kept without outcomes (the cheapest agreeing configuration only): a configuration
      counts a label when it `covers` it, shrunk towards `prior_quality` with the weight of
      `prior_strength` labels. An assumption (more of the same context never hurts), used only
      while no label carries outcomes."""

    def __init__(self, prior_strength: float | None = None, max_labels: int = 1000) -> None:
        """`prior_strength`: the pooling weight in trials, fixed; None (the default): fitted
        from the measured outcomes (`fit_strength`). The covers estimate always uses it (or
        `DEFAULT_PRIOR_STRENGTH`)."""
        if prior_strength is not None and prior_strength <= 0:
            raise ValueError("prior_strength must be > 0")
        self.fixed_strength = prior_strength
        self.prior_strength = prior_strength or DEFAULT_PRIOR_STRENGTH
        self._strength = self.prior_strength
        self.labels: deque[Config] = deque(maxlen=max_labels)
        self._outcomes: deque[Mapping[Config, bool]] = deque(maxlen=max_labels)
        self._measured: dict[Config, tuple[int, int]] | None = None
        """(agreed, tried) per configuration over the kept labels (cached until a new label)."""
        self._pooled: float | None = None
        self._covered: dict[tuple[Config, int], float] = {}
        self._label_space: ConfigSpace | None = None

    def add_label(
        self, cheapest_agreeing: Config, outcomes: Mapping[Config, bool] | None = None
    ) -> None:
        """One labelled query: its cheapest agreeing configuration and, when known, every
        configuration tried on it and whether its answer agreed."""
        self.labels.append(cheapest_agreeing)
        self._outcomes.append(dict(outcomes or {}))
        self._measured = None
        self._covered.clear()
        self._label_space = None

    def label_space(self, min_labels: int = LABEL_SPACE_MIN) -> ConfigSpace | None:
        """The space the labelled queries needed, for a query with no trusted profile: the
        methods of their cheapest agreeing configurations, the range of their chunk counts and
        their summary budgets; None under `min_labels` labels. Inside it, best-fit's objective
        chooses by this model's predictions: what was measured, not a fixed box."""
        if len(self.labels) < max(min_labels, 1):
            return None
        if self._label_space is None:
            self._label_space = self._space_of_labels()
        return self._label_space

    def _space_of_labels(self) -> ConfigSpace:
        methods = tuple(m for m in METHODS if any(c.method == m for c in self.labels))
        chunks = [c.num_chunks for c in self.labels]
        ilens = sorted(
            {c.intermediate_length for c in self.labels
             if c.method in TAKES_INTERMEDIATE and c.intermediate_length is not None}
        )  # fmt: skip
        if any(m in TAKES_INTERMEDIATE for m in methods) and not ilens:
            methods = tuple(m for m in methods if m not in TAKES_INTERMEDIATE)
        return ConfigSpace(methods, (min(chunks), max(chunks)), tuple(ilens), source="labels")

    def measured(self) -> dict[Config, tuple[int, int]]:
        """(agreed, tried) per configuration tried on some labelled query."""
        if self._measured is None:
            counts: dict[Config, list[int]] = {}
            for outcomes in self._outcomes:
                for config, agreed in outcomes.items():
                    c = counts.setdefault(config, [0, 0])
                    c[0] += bool(agreed)
                    c[1] += 1
            self._measured = {k: (a, n) for k, (a, n) in counts.items()}
            tried = sum(n for _, n in counts.values())
            self._pooled = sum(a for a, _ in counts.values()) / tried if tried else None
            self._strength = (
                self.fixed_strength
                if self.fixed_strength is not None
                else fit_strength(list(self._measured.values()), self.prior_strength)
            )
        return self._measured

    def indifferent(self) -> bool:
        """Whether the labels show no configuration answering better than another: measured
        outcomes whose spread is all sampling (`fit_strength` pools them fully)."""
        return bool(self.measured()) and self._strength >= FULL_POOLING

    def strength(self) -> float:
        """The pooled rate's weight, in trials, in each measured configuration's rate."""
        self.measured()  # fitted with it, once per new label
        return self._strength

    def covered(self, config: Config, space: ConfigSpace) -> float:
        """The covers estimate: labels `config` covers, shrunk towards the prior."""
        key = (config, space.num_chunks[0])
        if key not in self._covered:
            q0 = prior_quality(config.num_chunks, space.num_chunks[0])
            hit = sum(covers(config, lab) for lab in self.labels)
            n = len(self.labels)
            self._covered[key] = (hit + self.prior_strength * q0) / (n + self.prior_strength)
        return self._covered[key]

    def pooled(self) -> float | None:
        """The agreement rate over every trial of every configuration (None: nothing tried)."""
        self.measured()  # computed with it, once per new label
        return self._pooled

    def best_rate(self, method: str) -> float | None:
        """The most `predict` can say of any configuration of `method` while outcomes are
        measured: its best measured configuration's rate (interpolation and the nearest tried
        never exceed it), the pooled rate for a method never tried; None: nothing measured."""
        measured = self.measured()
        if not measured:
            return None
        rates = [self._rate(c) for c in measured if c.method == method]
        return max(rates) if rates else self.pooled()

    def _rate(self, config: Config) -> float:
        agreed, tried = self.measured()[config]
        prior, m = self.pooled() or 0.0, self._strength
        return (agreed + m * prior) / (tried + m)

    def predict(self, config: Config, space: ConfigSpace) -> float:
        measured = self.measured()
        if not measured:
            return self.covered(config, space)
        if config in measured:
            return self._rate(config)
        same_method = [c for c in measured if c.method == config.method]
        if not same_method:
            return self.pooled() or 0.0
        want = config.intermediate_length or 0
        ilen = min(
            {c.intermediate_length for c in same_method},
            key=lambda x: (abs((x or 0) - want), x or 0),
        )
        family = sorted(
            (c for c in same_method if c.intermediate_length == ilen), key=lambda c: c.num_chunks
        )
        k = config.num_chunks
        below = [c for c in family if c.num_chunks <= k]
        above = [c for c in family if c.num_chunks >= k]
        if not below:
            return self._rate(above[0])
        if not above:
            return self._rate(below[-1])
        lo, hi = below[-1], above[0]
        if lo == hi:  # the same chunk count, tried at another summary budget
            return self._rate(lo)
        t = (k - lo.num_chunks) / (hi.num_chunks - lo.num_chunks)
        return (1 - t) * self._rate(lo) + t * self._rate(hi)
