"""Cost-aware best-fit (hypothesis), over the same arbitrary spaces, KV states and monotone need
functions as best-fit's own properties, with synthetic delay and quality predictors:

- every objective: never more than available; a configuration exactly when `choose` gives
  one, for the same reason (fit, fallback, wait);
- `quality` is exactly today's `choose`;
- `latency` picks a fitting configuration of minimum predicted delay (ties: the larger need);
- `balanced`: under a flat delay model it is `quality`; always d(pick) <= d(Q) for Q the
  quality pick, and a pick c != Q pays for its quality loss with time:
  q(Q) - q(c) < w * (d(Q) - d(c)) / d_min; and it is optimal: no fitting candidate faster
  than Q has a larger utility q - w * d / d_min than the pick.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ragctl.scheduler import choose
from ragctl.scheduler.cost import QualityModel, prior_quality
from ragctl.scheduler.objective import RECORD_CANDIDATES, choose_objective
from ragctl.types import METHODS, Config, ConfigSpace
from tests.unit.test_scheduler_properties import eligible, kv_states, need_functions, spaces


@st.composite
def delay_functions(draw):
    """Non-negative linear delays in the chunk count, per method (one more stage costs its
    base again) and the summary budget: from flat (all zero slopes) to steep."""
    base = draw(st.floats(0.01, 5))
    per_chunk = {m: draw(st.floats(0, 3)) for m in METHODS}
    per_stage = draw(st.floats(0, 2))
    per_ilen = draw(st.floats(0, 0.02))

    def delay(c: Config) -> float:
        stages = 2 if c.intermediate_length else 1
        extra = per_ilen * (c.intermediate_length or 0) * c.num_chunks
        return base + per_stage * stages + per_chunk[c.method] * c.num_chunks + extra

    return delay


@st.composite
def quality_functions(draw, space: ConfigSpace):
    """The prior alone, or a QualityModel with random labels (some with measured outcomes)."""
    config = st.builds(
        lambda method, k, ilen: Config(method, k, ilen if method == "map_reduce" else None),
        st.sampled_from(METHODS), st.integers(1, 12), st.integers(30, 300),
    )  # fmt: skip
    labels = draw(
        st.lists(
            st.tuples(config, st.dictionaries(config, st.booleans(), max_size=4)), max_size=20
        )
    )
    model = QualityModel(prior_strength=draw(st.floats(0.5, 10)))
    for label, outcomes in labels:
        model.add_label(label, {**outcomes, label: True} if outcomes else None)

    def quality(c: Config) -> float:
        q = model.predict(c, space)
        assert 0.0 <= q <= 1.0
        return q

    return quality


def plan_for(objective, space, need, state, reserved, joint, max_chunks, delay, quality, w=0.1):
    return choose_objective(
        space, state, reserved, need,
        joint_reasoning=joint, max_chunks=max_chunks, objective=objective,
        delay=delay, quality=quality, delay_weight=w,
    )  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    space=spaces(),
    need=need_functions(),
    state=kv_states(),
    reserved=st.integers(0, 500),
    joint=st.booleans(),
    max_chunks=st.integers(1, 20),
    delay=delay_functions(),
    w=st.floats(0, 2),
)
def test_objective_properties(data, space, need, state, reserved, joint, max_chunks, delay, w):
    quality = data.draw(quality_functions(space))
    today = choose(space, state, reserved, need, joint_reasoning=joint, max_chunks=max_chunks)
    plans = {
        o: plan_for(o, space, need, state, reserved, joint, max_chunks, delay, quality, w)
        for o in ("quality", "balanced", "latency")
    }
    available = today.available_blocks
    for plan in plans.values():
        assert plan.reason == today.reason
        assert (plan.free_blocks, plan.reserved_blocks) == (
            today.free_blocks,
            today.reserved_blocks,
        )
        if plan.config is None:
            assert plan == today  # a wait is today's wait
            continue
        assert plan.need_blocks == need(plan.config) <= available
        assert plan.config.num_chunks <= max_chunks
        ch = plan.choice
        assert ch is not None and ch.candidates[0].config == plan.config
        assert len(ch.candidates) <= RECORD_CANDIDATES and ch.fitting >= len(ch.candidates)
        if plan.reason == "fallback":  # fallbacks stay today's
            assert plan.config == today.config

    q_plan = plans["quality"]
    assert (q_plan.config, q_plan.reason, q_plan.need_blocks) == (
        today.config, today.reason, today.need_blocks,
    )  # fmt: skip
    if today.reason != "fit":
        return
    fitting = [c for c in eligible(space, max_chunks) if need(c) <= available]
    assert plans["quality"].choice.fitting == len(fitting)

    lat = plans["latency"].config
    fastest = min(delay(c) for c in fitting)
    assert delay(lat) == fastest
    assert need(lat) == max(need(c) for c in fitting if delay(c) == fastest)

    top, bal = today.config, plans["balanced"].config
    d_min = max(fastest, 1e-9)

    def utility(c: Config) -> float:
        return quality(c) - w * delay(c) / d_min

    assert delay(bal) <= delay(top)
    if bal != top:
        assert delay(bal) < delay(top)
        assert quality(top) - quality(bal) < w * (delay(top) - delay(bal)) / d_min + 1e-9
    faster = [c for c in fitting if delay(c) < delay(top)]
    assert all(utility(c) <= utility(bal) + 1e-9 for c in faster)


@settings(max_examples=150, deadline=None)
@given(
    space=spaces(),
    need=need_functions(),
    state=kv_states(),
    reserved=st.integers(0, 500),
    joint=st.booleans(),
    max_chunks=st.integers(1, 20),
    flat=st.floats(0.01, 10),
    w=st.floats(0, 5),
)
def test_balanced_is_quality_under_a_flat_delay_model(
    space, need, state, reserved, joint, max_chunks, flat, w
):
    """Where memory binds and time does not grow with size, balanced behaves like METIS."""
    quality = QualityModel()
    args = (space, need, state, reserved, joint, max_chunks, lambda c: flat)
    q = plan_for("quality", *args, lambda c: quality.predict(c, space), w)
    b = plan_for("balanced", *args, lambda c: quality.predict(c, space), w)
    assert (b.config, b.reason, b.need_blocks) == (q.config, q.reason, q.need_blocks)


def test_balanced_stops_buying_delay_on_a_compute_bound_engine() -> None:
    """The issue's case: stuff or map_reduce over 3-9 chunks, all fitting; delay grows with
    tokens (map_reduce's 9 mappers and a reducer cost ~4x stuff:5). Quality (METIS) takes
    the largest; balanced a cheaper one, unless labels say the quality is worth it."""
    space = ConfigSpace(("stuff", "map_reduce"), (3, 9), (100,))
    from ragctl.types import KVState

    kv = KVState(10_000, 10_000, 16)

    def need(c: Config) -> int:
        return c.num_chunks * (12 if c.method == "map_reduce" else 8)

    def delay(c: Config) -> float:  # seconds: ~0.2 s per chunk of prompt, decode per stage
        return (
            1.0 + 0.2 * c.num_chunks + (0.45 * c.num_chunks + 1.0 if c.intermediate_length else 0)
        )

    prior = QualityModel()
    kwargs = dict(joint_reasoning=True, max_chunks=30, delay=delay)
    q = choose_objective(space, kv, 0, need, objective="quality",
                         quality=lambda c: prior.predict(c, space), **kwargs)  # fmt: skip
    b = choose_objective(space, kv, 0, need, objective="balanced",
                         quality=lambda c: prior.predict(c, space), **kwargs)  # fmt: skip
    assert q.config == Config("map_reduce", 9, 100)
    assert delay(b.config) < delay(q.config) and b.config.method == "stuff"
    assert "would cost" in b.choice.why
    # Labels saying only map_reduce over 9 chunks answers make the delay worth it.
    sure = QualityModel(prior_strength=0.5)
    for _ in range(200):
        sure.add_label(Config("map_reduce", 9, 100))
    b2 = choose_objective(space, kv, 0, need, objective="balanced", delay_weight=0.1,
                          quality=lambda c: sure.predict(c, space), **kwargs)  # fmt: skip
    assert b2.config == q.config
    # And on a memory-bound engine (time flat in size) balanced is METIS.
    flat = dict(kwargs, delay=lambda c: 2.0)
    b3 = choose_objective(space, kv, 0, need, objective="balanced",
                          quality=lambda c: prior.predict(c, space), **flat)  # fmt: skip
    assert b3.config == q.config
    assert prior_quality(9, 3) > prior_quality(3, 3)
