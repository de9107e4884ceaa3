"""The delay model (fitting known coefficients, load, prior, refit window and bounds, garbage
input, output share), the per-configuration work table against the sizer, and the quality
model's prior and labels."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from ragctl.scheduler.cost import (
    DEFAULT_PRIOR_STRENGTH,
    FEATURES,
    FULL_POOLING,
    LABEL_SPACE_MIN,
    NEUTRAL_PRIOR,
    DelayModel,
    Load,
    LoadMeter,
    QualityModel,
    StageWork,
    WorkTable,
    covers,
    features,
    fit_strength,
    prior_from_rates,
    prior_quality,
)
from ragctl.synthesis.methods import CallSizer
from ragctl.types import Config, ConfigSpace

TRUE = np.array([0.05, 0.002, 0.03, 0.01, 0.004, 0.0005])
"""Known coefficients in FEATURES order (all > 0, of the sizes real engines show)."""


def random_stage(rng: np.random.Generator) -> tuple[StageWork, Load]:
    calls = int(rng.integers(1, 12))
    steps = int(rng.integers(1, 300))
    work = StageWork(
        "s",
        calls,
        int(rng.integers(50, 1500)) * calls,
        steps,
        steps * calls - int(rng.integers(0, calls)),  # not every call reaches the longest
    )
    return work, Load(float(rng.integers(0, 20)), float(rng.integers(0, 20_000)))


def synthetic(n: int, seed: int, noise: float = 0.0, coef=TRUE):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        work, load = random_stage(rng)
        y = float(features(work, load) @ coef)
        if noise:
            y *= math.exp(rng.normal(0, noise))
        out.append((work, load, y))
    return out


def test_noise_free_observations_recover_the_coefficients_exactly() -> None:
    model = DelayModel(prior_weight=0.0, refit_every=1000)
    for w, load, y in synthetic(300, 1):
        assert model.observe(w, load, y) is None
    model.refit()
    np.testing.assert_allclose(model.coef, TRUE, rtol=1e-6)
    assert model.ready and model.source == "fitted"


def test_noisy_observations_recover_the_coefficients_and_predict_held_out_stages() -> None:
    model = DelayModel(window=2000, refit_every=50)
    for w, load, y in synthetic(1500, 2, noise=0.1):
        model.observe(w, load, y)
    # The per-stage constant (0.05 s) is small beside stages of seconds: within 0.1 s.
    np.testing.assert_allclose(model.coef[1:], TRUE[1:], rtol=0.2)
    assert abs(model.coef[0] - TRUE[0]) < 0.1
    held = synthetic(200, 3)
    errors = [abs(model.predict_stage(w, load) - y) / y for w, load, y in held]
    assert float(np.mean(errors)) < 0.05


def test_load_increases_the_prediction() -> None:
    model = DelayModel(window=1000)
    for w, load, y in synthetic(400, 4):
        model.observe(w, load, y)
    work = StageWork("s", 4, 2000, 100, 400)
    idle = model.predict_stage(work, Load())
    busy = model.predict_stage(work, Load(seqs=8, tokens=8000))
    assert busy > idle * 1.5
    # The prior alone sees load too: a decode step slows with every sequence in flight.
    fresh = DelayModel()
    assert fresh.predict_stage(work, Load(seqs=8)) > fresh.predict_stage(work)


def test_before_any_data_the_prior_predicts_and_is_not_ready() -> None:
    model = DelayModel()
    work = StageWork("answer", 1, 1000, 32, 32)
    assert not model.ready and model.source == "prior"
    np.testing.assert_allclose(model.coef, NEUTRAL_PRIOR)
    expected = 1000 / 1000.0 + 32 * (0.5 / 20.0) + 32 * (0.5 / 20.0)
    assert model.predict_stage(work) == pytest.approx(expected)
    # More work never predicts less time, already under the prior.
    assert model.predict_stage(StageWork("answer", 1, 2000, 32, 32)) > model.predict_stage(work)
    measured = DelayModel(prior_from_rates(400.0, 25.0, batch_growth=1.0), prior_measured=True)
    assert measured.ready and measured.source == "measured"
    assert measured.predict_stage(work) == pytest.approx(1000 / 400 + 32 / 25)
    for bad in ([1.0] * (len(FEATURES) - 1), [-1.0] + [0.0] * (len(FEATURES) - 1)):
        with pytest.raises(ValueError):
            DelayModel(bad)
    with pytest.raises(ValueError):
        prior_from_rates(0.0, 10.0)


def test_ready_after_min_observations_and_refits_every_n() -> None:
    model = DelayModel(refit_every=5, min_observations=8)
    data = synthetic(20, 5)
    for i, (w, load, y) in enumerate(data, 1):
        model.observe(w, load, y)
        assert model.ready == (i >= 8)
    # Fits at 5, 8 (ready), 13 (5 after 8) and 18.
    assert model.fits == 4


def test_the_window_forgets_an_old_regime() -> None:
    model = DelayModel(window=200, refit_every=200, prior_weight=0.0)
    for w, load, y in synthetic(200, 6, coef=TRUE * 3):
        model.observe(w, load, y)
    for w, load, y in synthetic(200, 7):
        model.observe(w, load, y)
    model.refit()
    assert model.observations == 400
    np.testing.assert_allclose(model.coef, TRUE, rtol=1e-6)


def test_coefficients_stay_non_negative_when_the_data_slope_down() -> None:
    """Seconds that fall as prompts grow (noise, a cache warming up) must not teach the
    model that more tokens take less time."""
    model = DelayModel(refit_every=1, prior_weight=0.0)
    for p in range(100, 2100, 100):
        model.observe(StageWork("s", 1, p, 10, 10), Load(), 3.0 - p / 1000)
    assert np.all(model.coef >= 0)
    assert model.predict_stage(StageWork("s", 1, 5000, 10, 10)) >= 0


@pytest.mark.parametrize(
    ("work", "load", "seconds", "reason"),
    [
        (StageWork("s", 1, 10, 5, 5), Load(), -1.0, "seconds"),
        (StageWork("s", 1, 10, 5, 5), Load(), float("nan"), "seconds"),
        (StageWork("s", 1, 10, 5, 5), Load(), float("inf"), "seconds"),
        (StageWork("s", 1, 10, 5, 5), Load(), 0.0, "seconds"),
        (StageWork("s", 1, -10, 5, 5), Load(), 1.0, "negative"),
        (StageWork("s", 1, 10, 5, 5), Load(seqs=float("nan")), 1.0, "non-finite"),
        (StageWork("s", 0, 10, 5, 5), Load(), 1.0, "without calls"),
    ],
)
def test_garbage_observations_are_ignored_with_a_reason(work, load, seconds, reason) -> None:
    model = DelayModel(refit_every=1)
    got = model.observe(work, load, seconds)
    assert got is not None and reason in got
    assert model.observations == 0 and model.fits == 0 and sum(model.rejected.values()) == 1
    np.testing.assert_allclose(model.coef, NEUTRAL_PRIOR)


def test_planned_outputs_are_scaled_by_the_share_of_the_budget_used() -> None:
    model = DelayModel(share_alpha=1.0)
    budget = StageWork("answer", 2, 400, 64, 128)
    assert model.expected(budget) == budget
    model.observe(StageWork("answer", 2, 400, 16, 32), Load(), 1.0, budget=budget)
    assert model.output_share("answer") == pytest.approx(0.25)
    assert model.expected(budget) == StageWork("answer", 2, 400, 16, 32)
    assert model.output_share("map") == 1.0  # per stage name


def test_the_output_share_is_the_mean_until_its_average_window_then_forgets_slowly() -> None:
    model = DelayModel(share_alpha=0.1)
    budget = StageWork("answer", 1, 100, 100, 100)
    # The first share is no more than one of ten: their mean, not 0.9^9 of the first.
    for out in (10, *[90] * 9):
        model.observe(StageWork("answer", 1, 100, out, out), Load(), 1.0, budget=budget)
    assert model.output_share("answer") == pytest.approx(0.82)
    for _ in range(50):  # beyond 1/alpha: the average moves towards what is seen now
        model.observe(StageWork("answer", 1, 100, 30, 30), Load(), 1.0, budget=budget)
    assert 0.30 < model.output_share("answer") < 0.31


def observe_shares(model: DelayModel, stage: str, shares) -> None:
    budget = StageWork(stage, 1, 100, 100, 100)
    for share in shares:
        out = round(share * 100)
        model.observe(StageWork(stage, 1, 100, out, out), Load(), 1.0, budget=budget)


def test_the_share_error_is_the_standard_error_over_the_recent_evidence() -> None:
    model = DelayModel(share_alpha=0.1)
    observe_shares(model, "answer", [0.5])
    assert model.share_error("answer") is None and model.share_error("map") is None
    shares = [0.5, 0.7, 0.9, 0.6]
    observe_shares(model, "answer", shares[1:])
    assert model.share_error("answer") == pytest.approx(np.std(shares, ddof=1) / 2)
    # Past the average's window the error stops shrinking: it never gets more certain than
    # the ~(2 - alpha) / alpha recent shares behind it, however many came before.
    observe_shares(model, "answer", [0.4, 0.8] * 500)
    assert model.share_error("answer") == pytest.approx(0.2 / math.sqrt(19), rel=0.1)
    observe_shares(model, "rerank", [0.3] * 20)  # no spread: no uncertainty
    assert model.share_error("rerank") == pytest.approx(0.0, abs=1e-9)


def test_share_draws_scatter_around_the_estimate_reproducibly() -> None:
    model = DelayModel(share_alpha=0.1, seed=7)
    observe_shares(model, "answer", [0.5, 0.7, 0.9, 0.6])
    observe_shares(model, "rerank", [0.4])  # seen once: its estimate, never drawn
    twin = copy.deepcopy(model)
    draws = [model.draw_shares() for _ in range(2000)]
    assert [twin.draw_shares() for _ in range(5)] == draws[:5]  # a copy draws the same
    assert {d[("", "rerank")] for d in draws} == {0.4}
    answer = np.array([d[("", "answer")] for d in draws])
    assert answer.min() >= 0.0 and answer.max() <= 1.0
    assert answer.mean() == pytest.approx(model.output_share("answer"), abs=0.01)
    assert answer.std() == pytest.approx(model.share_error("answer"), rel=0.1)
    # A prediction with a draw uses the drawn share in place of the estimate.
    budget = StageWork("answer", 1, 100, 100, 100)
    assert model.predict([budget], shares={("", "answer"): 0.2}) == pytest.approx(
        float(features(StageWork("answer", 1, 100, 20, 20)) @ model.coef)
    )
    assert model.predict([budget], shares={}) == model.predict([budget])


def test_near_tied_stages_trade_places_across_draws_and_far_apart_ones_never() -> None:
    model = DelayModel(share_alpha=0.1)
    rng = np.random.default_rng(3)
    observe_shares(model, "answer", rng.uniform(0.4, 1.0, 30))
    observe_shares(model, "rerank", rng.uniform(0.4, 1.0, 30))
    observe_shares(model, "map", rng.uniform(0.0, 0.2, 30))
    draws = [model.draw_shares() for _ in range(400)]
    answer, rerank, map_ = ("", "answer"), ("", "rerank"), ("", "map")
    answer_first = sum(d[answer] < d[rerank] for d in draws)
    assert 40 < answer_first < 360  # each is the cheaper one in a real share of the draws
    assert all(d[map_] < min(d[answer], d[rerank]) for d in draws)


def test_warm_start_fits_at_once_and_fresh_forgets() -> None:
    model = DelayModel(warm=synthetic(50, 8), prior_weight=0.0)
    assert model.ready and model.fits == 1
    np.testing.assert_allclose(model.coef, TRUE, rtol=1e-6)
    again = model.fresh()
    assert again.observations == 0 and not again.ready
    np.testing.assert_allclose(again.coef, NEUTRAL_PRIOR)


def test_load_meter_counts_calls_in_flight() -> None:
    meter = LoadMeter()
    with meter.running(3, 300):
        with meter.running(1, 50):
            assert meter.now() == Load(4, 350)
        assert meter.now() == Load(3, 300)
    with pytest.raises(RuntimeError), meter.running(2, 10):
        raise RuntimeError("engine died")
    assert meter.now() == Load()


# -- work per configuration ---------------------------------------------------------------------


SIZER = CallSizer(
    passages=(120, 80, 200, 150, 90, 60),
    overhead={"map_rerank": 40, "stuff": 50, "map": 45, "reduce": 55},
    answer_max_tokens=32,
    max_model_len=4096,
)


@pytest.mark.parametrize(
    "config",
    [Config("map_rerank", 4), Config("stuff", 6), Config("map_reduce", 3, 64), Config("stuff", 9)],
)
def test_work_table_sums_the_sizers_calls_per_stage(config) -> None:
    """The same call sizes as the memory model's (`CallSizer.estimate`), summed per stage."""
    table = WorkTable(SIZER)
    calls = SIZER.estimate(config)
    for work in table(config):
        mine = [c for c in calls if c.stage == work.stage]
        assert work.calls == len(mine)
        assert work.prompt_tokens == sum(c.prompt_tokens for c in mine)
        assert work.decode_steps == max(c.max_tokens for c in mine)
        assert work.output_tokens == sum(c.max_tokens for c in mine)
    assert [w.stage for w in table(config)] == list(dict.fromkeys(c.stage for c in calls))
    # What one call reads: a chunk in a per-chunk stage, all n in a one-call stage.
    n = SIZER.chunks_used(config)
    widths = {w.stage: w.width for w in table(config)}
    assert widths == {"rerank": 1} or widths == {"answer": n} or widths == {"map": 1, "reduce": n}


def observe_widths(model: DelayModel, stage: str, by_width: dict[int, list[float]]) -> None:
    """Observe each width's shares in turn, interleaved (as a grid's cells come)."""
    for shares in zip(*by_width.values(), strict=True):
        for width, share in zip(by_width, shares, strict=True):
            budget = StageWork(stage, 1, 100, 100, 100, width=width)
            out = round(share * 100)
            model.observe(StageWork(stage, 1, 100, out, out), Load(), 1.0, budget=budget)


def test_a_widths_share_is_its_own_where_widths_differ_beyond_their_errors() -> None:
    model = DelayModel(share_alpha=0.1)
    rng = np.random.default_rng(0)
    observe_widths(model, "answer", {1: rng.normal(0.5, 0.05, 30), 6: rng.normal(0.9, 0.05, 30)})
    assert model.output_share("answer", 1) == pytest.approx(0.5, abs=0.03)
    assert model.output_share("answer", 6) == pytest.approx(0.9, abs=0.03)
    one, six = (StageWork("answer", 1, 600, 100, 100, width=w) for w in (1, 6))
    assert model.expected(one).output_tokens == round(100 * model.output_share("answer", 1))
    assert model.predict([one]) < model.predict([six])
    # A width never seen, or a stage with one width, keeps the stage's share.
    assert model.output_share("answer", 3) == model.output_share("answer")
    observe_widths(model, "rerank", {1: [0.3, 0.5, 0.4]})
    assert model.output_share("rerank", 1) == model.output_share("rerank") == pytest.approx(0.4)
    # A draw of the stage's share moves every width's by as much.
    drawn = model.output_share("answer") + 0.05
    assert model.expected(one, {("", "answer"): drawn}).output_tokens == round(
        100 * (model.output_share("answer", 1) + 0.05)
    )


def test_widths_that_differ_within_their_errors_share_one_estimate() -> None:
    model = DelayModel(share_alpha=0.1)
    rng = np.random.default_rng(1)
    same = {w: np.round(rng.uniform(0.2, 1.0, 8), 2) for w in (1, 2, 3)}  # one distribution
    observe_widths(model, "answer", same)
    shares = {w: model.output_share("answer", w) for w in same}
    assert len(set(shares.values())) == 1
    assert shares[1] == pytest.approx(np.mean([np.mean(v) for v in same.values()]))


def test_a_trend_in_width_is_followed_to_its_ends_not_pulled_to_the_middle() -> None:
    """Answers that run longer the more they read, with errors as large as the steps between
    widths (25 calls each, spread 0.25): width 1 keeps its own level, below the widths' mean,
    where pooling towards that mean would price it as long as the middle widths."""
    pattern = np.random.default_rng(2).normal(size=25)
    pattern = (pattern - pattern.mean()) / pattern.std(ddof=1)  # exact mean 0, spread 1
    levels = {1: 0.74, 2: 0.83, 3: 0.88, 4: 0.93, 6: 0.91}
    model = DelayModel()
    trend = {w: np.clip(m + 0.25 * pattern, 0, 1) for w, m in levels.items()}
    observe_widths(model, "answer", trend)
    shares = [model.output_share("answer", w) for w in levels]
    assert shares[0] == pytest.approx(0.74, abs=0.025)
    assert shares[0] < float(np.mean(list(levels.values()))) - 0.05
    assert shares == sorted(shares)  # the line, not the noise: 6 is not below 4
    # The same widths with no trend beyond their errors still share one estimate.
    flat = DelayModel()
    observe_widths(flat, "answer", {w: np.clip(0.85 + 0.25 * pattern, 0, 1) for w in levels})
    assert len({round(flat.output_share("answer", w), 9) for w in levels}) == 1


def test_output_shares_are_learned_per_collection_and_a_new_one_starts_from_all() -> None:
    """One engine serving two collections: short answers in one, long in the other. Each is
    predicted by its own share; a collection that has not run the stage gets the pooled one."""
    model = DelayModel()
    for collection, share in (("squad", 0.2), ("finsec", 0.8)):
        for _ in range(20):
            budget = StageWork("answer", 1, 300, 100, 100, collection=collection)
            out = round(share * 100)
            model.observe(StageWork("answer", 1, 300, out, out), Load(), 1.0, budget=budget)
    assert model.output_share("answer", collection="squad") == pytest.approx(0.2)
    assert model.output_share("answer", collection="finsec") == pytest.approx(0.8)
    assert model.output_share("answer", collection="qmsum") == pytest.approx(0.5)
    assert model.output_share("answer", 1, "finsec") == pytest.approx(0.8)
    short, long = (StageWork("answer", 1, 300, 100, 100, collection=c) for c in ("squad", "finsec"))
    assert model.expected(short).output_tokens == 20 and model.expected(long).output_tokens == 80
    assert model.predict([short]) < model.predict([long])
    assert set(model.draw_shares()) == {("squad", "answer"), ("finsec", "answer")}
    assert model.to_dict()["output_share"] == pytest.approx(
        {"squad/answer": 0.2, "finsec/answer": 0.8}
    )


# -- quality ------------------------------------------------------------------------------------

SPACE = ConfigSpace(("stuff", "map_reduce"), (3, 9), (100,))


def test_quality_prior_is_monotone_and_concave_in_chunks() -> None:
    q = [prior_quality(k, 3) for k in range(1, 31)]
    gains = np.diff(q)
    assert np.all(gains > 0) and np.all(np.diff(gains) < 0)
    assert 0 < q[0] and q[-1] < 1
    assert prior_quality(3, 3) == pytest.approx(1 - math.exp(-1))


def test_quality_from_labels_shrinks_towards_the_prior() -> None:
    model = QualityModel(prior_strength=5)
    stuff3 = Config("stuff", 3)
    assert model.predict(stuff3, SPACE) == pytest.approx(prior_quality(3, 3))
    for _ in range(95):
        model.add_label(Config("map_rerank", 2))  # answered by two chunks read one by one
    for _ in range(5):
        model.add_label(Config("map_reduce", 8, 100))
    q = model.predict(stuff3, SPACE)
    assert q == pytest.approx((95 + 5 * prior_quality(3, 3)) / 105)
    assert model.predict(Config("map_reduce", 9, 100), SPACE) > q
    assert model.predict(Config("map_rerank", 1), SPACE) < q


def test_measured_outcomes_override_the_covers_assumption() -> None:
    """Labels that say which configurations were tried: the measured agreement rate wins over
    "more chunks cover more", so a model that more context distracts gets its small ones."""
    model = QualityModel(prior_strength=5)
    one, three, nine = Config("stuff", 1), Config("stuff", 3), Config("stuff", 9)
    for i in range(40):
        # stuff:1 answers 30 of 40, stuff:3 all 40, stuff:9 only 10.
        outcomes = {one: i < 30, three: True, nine: i < 10}
        model.add_label(one if i < 30 else three, outcomes)
    assert model.measured()[nine] == (10, 40)
    q1, q3, q9 = (model.predict(c, SPACE) for c in (one, three, nine))
    assert q9 < q1 < q3
    pooled = (30 + 40 + 10) / 120  # every trial of every configuration
    assert model.pooled() == pytest.approx(pooled)
    assert q1 == pytest.approx((30 + 5 * pooled) / 45)
    # Never tried: interpolated inside its family's tried chunk counts, the nearest outside.
    q6 = model.predict(Config("stuff", 6), SPACE)
    assert q6 == pytest.approx((q3 + q9) / 2)
    assert model.predict(Config("stuff", 12), SPACE) == pytest.approx(q9)
    # A method never tried: the pooled rate (no evidence either way).
    assert model.predict(Config("map_rerank", 2), SPACE) == pytest.approx(pooled)
    # A summary budget never tried reads the nearest one tried of its method.
    reduce50 = Config("map_reduce", 3, 50)
    model.add_label(three, {three: True, reduce50: False})
    assert model.predict(Config("map_reduce", 3, 75), SPACE) == model.predict(reduce50, SPACE)
    assert model.predict(Config("map_reduce", 6, 100), SPACE) == model.predict(reduce50, SPACE)
    assert model.predict(reduce50, SPACE) < model.covered(reduce50, SPACE)


def test_the_label_space_spans_what_the_labelled_queries_needed() -> None:
    model = QualityModel()
    labels = [Config("map_rerank", 1), Config("stuff", 6), Config("map_reduce", 3, 50)]
    for i in range(LABEL_SPACE_MIN - 1):
        model.add_label(labels[i % 3])
    assert model.label_space() is None  # too few labels
    model.add_label(Config("map_reduce", 4, 100))
    assert model.label_space() == ConfigSpace(
        ("map_rerank", "stuff", "map_reduce"), (1, 6), (50, 100), source="labels"
    )
    assert model.label_space(min_labels=100) is None
    one = QualityModel()
    for _ in range(LABEL_SPACE_MIN):
        one.add_label(Config("stuff", 2))
    assert one.label_space() == ConfigSpace(("stuff",), (2, 2), source="labels")


def test_a_difference_within_a_few_trials_is_pulled_together() -> None:
    """Partial pooling: one agreement more out of 7 trials separates two configurations less
    than the same rate over 700 trials does."""
    few, many = QualityModel(prior_strength=5), QualityModel(prior_strength=5)
    one, three = Config("stuff", 1), Config("stuff", 3)
    for model, n in ((few, 7), (many, 700)):
        for i in range(n):  # stuff:1 answers every labelled query, stuff:3 six of seven
            model.add_label(one, {one: True, three: i % 7 < 6})
    gap = lambda m: m.predict(one, SPACE) - m.predict(three, SPACE)  # noqa: E731
    assert 0 < gap(few) < gap(many) and gap(many) == pytest.approx(1 / 7, abs=0.005)


def test_pooling_weight_is_estimated_from_the_spread_the_trials_cannot_explain() -> None:
    """Empirical Bayes: 16 configurations over 10 labels whose rates (0.1 to 0.5) differ no
    more than 10 trials each would make them differ anyway are pooled fully; two that differ
    by 36 and 4 of 40 keep their difference."""
    noisy = [(5, 10), (4, 10), *[(3, 10)] * 4, *[(2, 10)] * 7, *[(1, 10)] * 3]
    assert fit_strength(noisy, 5.0) == FULL_POOLING
    real = fit_strength([(36, 40), (4, 40)], 5.0)
    assert 0 <= real < 1  # tau^2 ~ 0.16 against p(1 - p) = 0.25: next to no pooling
    # Nothing to estimate from: the default.
    assert fit_strength([(3, 10)], 5.0) == 5.0
    assert fit_strength([(0, 10), (0, 10)], 5.0) == fit_strength([(9, 9), (4, 4)], 5.0) == 5.0
    assert fit_strength([], 5.0) == 5.0

    model = QualityModel()
    configs = [Config("stuff", k) for k in (1, 2, 3, 4, 6, 9)]
    agreed = {1: 2, 2: 3, 3: 2, 4: 2, 6: 5, 9: 3}  # stuff:6 "best" by 5 of 10: noise
    for i in range(10):
        model.add_label(Config("stuff", 1), {c: i < agreed[c.num_chunks] for c in configs})
    assert model.strength() == FULL_POOLING
    q = [model.predict(c, SPACE) for c in configs]
    assert max(q) - min(q) < 1e-4 and q[0] == pytest.approx(model.pooled(), abs=1e-4)
    # A fixed weight is kept as given (and the default when none is given before any outcome).
    fixed = QualityModel(prior_strength=5)
    for i in range(10):
        fixed.add_label(Config("stuff", 1), {c: i < agreed[c.num_chunks] for c in configs})
    assert fixed.strength() == 5 and QualityModel().strength() == DEFAULT_PRIOR_STRENGTH
    assert fixed.predict(Config("stuff", 6), SPACE) > fixed.predict(Config("stuff", 1), SPACE)


def test_labels_without_outcomes_predict_as_before() -> None:
    model, old = QualityModel(), QualityModel()
    for label in (Config("stuff", 2), Config("map_rerank", 1), Config("stuff", 6)):
        model.add_label(label, None)
        old.add_label(label)
    for k in range(1, 13):
        c = Config("stuff", k)
        assert model.predict(c, SPACE) == old.predict(c, SPACE) == old.covered(c, SPACE)


def test_covers_needs_a_method_as_rich_more_chunks_and_the_summary_budget() -> None:
    assert covers(Config("stuff", 5), Config("map_rerank", 3))
    assert not covers(Config("map_rerank", 9), Config("stuff", 3))
    assert not covers(Config("stuff", 2), Config("stuff", 3))
    assert covers(Config("map_reduce", 4, 100), Config("map_reduce", 4, 50))
    assert not covers(Config("map_reduce", 4, 50), Config("map_reduce", 4, 100))
