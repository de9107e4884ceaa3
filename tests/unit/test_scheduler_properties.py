"""Scheduler properties (hypothesis): best-fit over arbitrary spaces, KV states and monotone
synthetic need functions; the ledger over arbitrary reserve/release sequences; the admission
queue over concurrent queries against a synthetic engine (each example runs its own event loop
with `asyncio.run`)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragctl.errors import QueueFull
from ragctl.policy import chunk_cap, gap_cut
from ragctl.scheduler import AdmissionQueue, KVLedger, choose
from ragctl.types import METHODS, Config, ConfigSpace, KVState

# -- best-fit ----------------------------------------------------------------------------------


@st.composite
def spaces(draw) -> ConfigSpace:
    methods = draw(st.lists(st.sampled_from(METHODS), min_size=1, max_size=3, unique=True))
    lo = draw(st.integers(1, 8))
    hi = draw(st.integers(lo, lo + 8))
    ilens: tuple[int, ...] = ()
    if "map_reduce" in methods:
        ilens = tuple(draw(st.lists(st.integers(30, 300), min_size=1, max_size=3, unique=True)))
    return ConfigSpace(tuple(methods), (lo, hi), ilens)


@st.composite
def need_functions(draw):
    """need = (per-chunk cost of the method * n + ilen weight) // q + base: non-decreasing in
    the chunk count (ties are likely for q > 1, which exercises the tie-break)."""
    per_chunk = {m: draw(st.integers(1, 20)) for m in METHODS}
    ilen_weight = draw(st.integers(0, 3))
    q = draw(st.integers(1, 6))
    base = draw(st.integers(0, 5))

    def need(config: Config) -> int:
        cost = per_chunk[config.method] * config.num_chunks
        if config.intermediate_length:
            cost += config.num_chunks * ilen_weight * config.intermediate_length // 30
        return cost // q + base

    return need


@st.composite
def kv_states(draw) -> KVState:
    total = draw(st.integers(0, 400))
    return KVState(total, draw(st.integers(0, total)), draw(st.sampled_from([1, 16])))


def eligible(space: ConfigSpace, max_chunks: int) -> set[Config]:
    """The space's configurations that use at most the retrieved chunks; a space entirely above
    them collapses to its smallest chunk count, moved down to what was retrieved."""
    lo, _ = space.num_chunks
    if lo <= max_chunks:
        return {c for c in space.configs() if c.num_chunks <= max_chunks}
    return {
        Config(c.method, max_chunks, c.intermediate_length)
        for c in space.configs()
        if c.num_chunks == lo
    }


def rank(need, config: Config) -> tuple:
    return (
        need(config),
        config.num_chunks,
        METHODS.index(config.method),
        config.intermediate_length or 0,
    )


@settings(max_examples=250, deadline=None)
@given(
    space=spaces(),
    need=need_functions(),
    state=kv_states(),
    reserved_total=st.integers(0, 500),
    joint=st.booleans(),
    max_chunks=st.integers(1, 20),
)
def test_best_fit_properties(space, need, state, reserved_total, joint, max_chunks) -> None:
    calls: Counter[Config] = Counter()

    def counting(config: Config) -> int:
        calls[config] += 1
        return need(config)

    plan = choose(
        space, state, reserved_total, counting, joint_reasoning=joint, max_chunks=max_chunks
    )
    assert max(calls.values()) == 1  # memoised: one estimate per configuration

    unshown = max(0, reserved_total - (state.total_blocks - state.free_blocks))
    available = state.free_blocks - unshown
    assert (plan.free_blocks, plan.reserved_blocks) == (state.free_blocks, unshown)
    assert plan.available_blocks == available

    inside = eligible(space, max_chunks)
    hi = max(c.num_chunks for c in inside)
    fitting_inside = [c for c in inside if need(c) <= available]

    if plan.config is not None:
        assert plan.need_blocks == need(plan.config) <= available
        assert plan.config.num_chunks <= max_chunks

    if fitting_inside:
        assert plan.reason == "fit" and plan.config in inside
        best = max(fitting_inside, key=lambda c: rank(need, c))
        assert plan.config == best
        assert all(need(c) <= plan.need_blocks for c in fitting_inside)
        return

    # Nothing in the space fits: a fallback outside it when its cheapest one fits, else wait.
    smallest = Config("stuff" if joint else "map_rerank", 1)
    if smallest not in inside and need(smallest) <= available:
        assert plan.reason == "fallback"
    else:
        assert plan.reason in ("fallback", "wait")  # a larger fallback may still fit
    if plan.reason == "wait":
        assert plan.config is None and plan.need_blocks > available
    if plan.reason == "fallback":
        c = plan.config
        assert c not in inside and 1 <= c.num_chunks <= hi
        if not joint:
            assert c.method == "map_rerank"
            # The most chunks that fit (need is non-decreasing in the chunk count).
            bigger = [Config("map_rerank", k) for k in range(c.num_chunks + 1, hi + 1)]
            assert all(need(b) > available for b in bigger if b not in inside)
        else:
            assert c.method in ("stuff", "map_reduce")
            if c.method == "map_reduce":
                assert "map_reduce" in space.methods
                assert c.intermediate_length == min(space.intermediate_lengths)
            stuffs = [Config("stuff", k) for k in range(1, hi + 1)]
            assert all(
                need(s) <= plan.need_blocks
                for s in stuffs
                if s not in inside and need(s) <= available
            )
    else:
        assert plan.config is None
        smallest_fallback = Config("map_rerank" if not joint else "stuff", 1)
        candidates = [*inside] + ([smallest_fallback] if smallest_fallback not in inside else [])
        # Waiting only when even one chunk does not fit, and for the smallest need there is.
        assert all(need(c) > available for c in candidates)
        assert plan.need_blocks > available
        assert plan.need_blocks <= min(need(c) for c in candidates)
        # Liveness: once that much is available, the same query gets a configuration.
        more = plan.need_blocks - available  # same used blocks, `more` extra free ones
        roomier = KVState(state.total_blocks + more, state.free_blocks + more, state.block_size)
        again = choose(
            space, roomier, reserved_total, need, joint_reasoning=joint, max_chunks=max_chunks
        )
        assert again.available_blocks == plan.need_blocks and again.config is not None


@settings(max_examples=100, deadline=None)
@given(
    space=spaces(),
    need=need_functions(),
    state=kv_states(),
    joint=st.booleans(),
    max_chunks=st.integers(1, 20),
)
def test_choice_does_not_depend_on_method_order(space, need, state, joint, max_chunks) -> None:
    flipped = ConfigSpace(space.methods[::-1], space.num_chunks, space.intermediate_lengths[::-1])
    a = choose(space, state, 0, need, joint_reasoning=joint, max_chunks=max_chunks)
    b = choose(flipped, state, 0, need, joint_reasoning=joint, max_chunks=max_chunks)
    assert a == b


# -- ledger ------------------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 50)),
        st.tuples(st.just("release"), st.integers(0, 30)),
        st.tuples(st.just("with_raise"), st.integers(0, 50)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops)
def test_ledger_balances_over_any_reserve_release_sequence(ops) -> None:
    ledger = KVLedger()
    held = []
    released_ok: Counter[int] = Counter()  # id(reservation) -> successful releases
    expected = 0
    for op, n in ops:
        if op == "reserve":
            held.append(ledger.reserve(n))
            expected += n
        elif op == "release" and held:
            r = held[n % len(held)]
            first = not r.released
            assert r.release() is first
            if first:
                expected -= r.blocks
                released_ok[id(r)] += 1
        elif op == "with_raise":
            before = ledger.reserved
            try:
                with ledger.reserve(n) as r:
                    assert ledger.reserved == before + n
                    raise KeyError("boom")
            except KeyError:
                pass
            assert r.released and ledger.reserved == before
        assert ledger.reserved == expected
    for r in held:
        if r.release():
            released_ok[id(r)] += 1
    assert ledger.reserved == 0
    assert all(released_ok[id(r)] == 1 for r in held)


# -- admission queue ---------------------------------------------------------------------------


class Engine:
    """A synthetic engine: a reservation becomes visible as used blocks once its query
    'starts', and stops being used just before it is released. kv_state sometimes yields, as a
    real read would."""

    def __init__(self, total: int, rng: random.Random) -> None:
        self.total = total
        self.shown = 0
        self.rng = rng

    async def kv_state(self) -> KVState:
        if self.rng.random() < 0.5:
            await asyncio.sleep(0)
        return KVState(self.total, self.total - self.shown, 16)


def decide_for(need: int, arrivals: list[int], i: int):
    space = ConfigSpace(("map_rerank",), (1, 1))

    def decide(state: KVState, reserved: int):
        if i not in arrivals:
            arrivals.append(i)  # first decision: no await between it and joining the queue
        return choose(space, state, reserved, lambda c: need, joint_reasoning=False, max_chunks=1)

    return decide


async def run_load(seed: int, needs: list[int], total: int, maxsize: int, cancel: set[int]) -> None:
    rng = random.Random(seed)
    engine, ledger = Engine(total, rng), KVLedger()
    queue = AdmissionQueue(ledger, engine.kv_state, maxsize=maxsize, poll_s=0.002)
    arrivals: list[int] = []
    admitted: list[int] = []  # in order of admission
    queued: set[int] = set()
    outcome: dict[int, str] = {}

    async def query(i: int) -> None:
        try:
            adm = await queue.admit(decide_for(needs[i], arrivals, i))
        except QueueFull:
            assert len(queue) == maxsize  # refused only when the queue is full
            outcome[i] = "refused"
            return
        # Safety: reservations never exceed the cache (no await between decide and reserve).
        assert ledger.reserved <= total
        assert adm.reservation.blocks == adm.plan.need_blocks == needs[i]
        admitted.append(i)
        if adm.queued:
            queued.add(i)
        with adm.reservation:
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
            engine.shown += needs[i]
            try:
                for _ in range(rng.randint(0, 3)):
                    await asyncio.sleep(0)
            finally:
                engine.shown -= needs[i]
        outcome[i] = "done"

    tasks = {}
    for i in range(len(needs)):
        tasks[i] = asyncio.create_task(query(i))
        if rng.random() < 0.3:
            await asyncio.sleep(0)
    for i in cancel:
        if i not in outcome:  # still waiting, or not started
            tasks[i].cancel()
    async with asyncio.timeout(2):  # a hang is a failure
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)

    for i, result in zip(tasks, results, strict=True):
        if isinstance(result, asyncio.CancelledError):
            assert i in cancel
        elif isinstance(result, BaseException):
            raise result
        else:
            assert outcome[i] in ("done", "refused")
    # Nothing accepted is dropped: all not cancelled and not refused completed.
    done = {i for i, o in outcome.items() if o == "done"}
    refused = {i for i, o in outcome.items() if o == "refused"}
    assert done | refused | cancel >= set(range(len(needs)))
    if maxsize >= len(needs):
        assert not refused
    # FIFO, no overtaking: a query that queued is admitted before every query that arrived
    # (first decided) after it, queued or not. Arrival = joining the queue for those that do.
    for q in queued:
        later = arrivals[arrivals.index(q) + 1 :]
        assert all(admitted.index(q) < admitted.index(p) for p in later if p in admitted)
    assert ledger.reserved == 0 and len(queue) == 0 and engine.shown == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    total=st.integers(10, 100),
    data=st.data(),
)
def test_concurrent_admissions_all_complete_in_fifo_order(seed, total, data) -> None:
    needs = data.draw(st.lists(st.integers(0, total), min_size=1, max_size=12))
    maxsize = data.draw(st.integers(0, len(needs) + 1))
    cancel = set(data.draw(st.lists(st.integers(0, len(needs) - 1), max_size=3)))
    asyncio.run(run_load(seed, needs, total, maxsize, cancel))


# -- the need table ---------------------------------------------------------------------------


@given(
    passages=st.lists(st.integers(0, 700), min_size=1, max_size=30),
    overheads=st.tuples(*(st.integers(20, 400) for _ in range(4))),
    answer=st.integers(1, 300),
    max_model_len=st.integers(1200, 8192),
    block_size=st.sampled_from([1, 16, 128]),
    buffer=st.integers(0, 3),
    configs=st.lists(
        st.tuples(st.sampled_from(METHODS), st.integers(1, 40), st.integers(1, 300)), max_size=20
    ),
)
def test_need_table_equals_the_need_of_the_estimated_calls(
    passages, overheads, answer, max_model_len, block_size, buffer, configs
) -> None:
    from ragctl.scheduler import NeedTable, config_need
    from ragctl.synthesis.methods import CallSizer

    sizer = CallSizer(
        passages=tuple(passages),
        overhead=dict(zip(("map_rerank", "stuff", "map", "reduce"), overheads, strict=True)),
        answer_max_tokens=answer,
        max_model_len=max_model_len,
    )
    table = NeedTable(sizer, block_size, buffer)
    for method, n, ilen in configs:
        config = Config(method, n, ilen if method == "map_reduce" else None)
        assert table(config) == config_need(sizer.estimate(config), block_size, buffer), config


# -- retrieval-aware chunk counts (Adaptive-k) ---------------------------------------------------


def test_gap_cut_ends_at_the_largest_drop_inside_the_range() -> None:
    scores = [0.9, 0.88, 0.4, 0.38, 0.37, 0.2, 0.19]
    assert gap_cut(scores, 1, 6) == 2  # 0.88 -> 0.4 is the largest drop after 1..6 chunks
    assert gap_cut(scores, 3, 6) == 5  # inside 3..6 the drop after the 5th is largest
    assert gap_cut(scores, 3, 3) == 3
    assert gap_cut(scores[:4], 3, 9) == 4  # fewer retrieved than the range: all of them
    assert gap_cut([], 3, 9) == 0  # nothing retrieved stays nothing (best-fit refuses it)
    assert gap_cut([0.5, 0.5, 0.5, 0.5], 1, 3) == 1  # no drop anywhere: the smaller count


@given(
    scores=st.lists(st.floats(0, 1), min_size=1, max_size=30).map(
        lambda s: sorted(s, reverse=True)
    ),
    lo=st.integers(1, 12),
    width=st.integers(0, 24),
)
def test_gap_cut_stays_inside_the_range_and_what_was_retrieved(scores, lo, width) -> None:
    hi = lo + width
    k = gap_cut(scores, lo, hi)
    assert 1 <= k <= len(scores) and k <= hi
    assert k >= min(lo, len(scores))


def test_chunk_cap_is_everything_retrieved_unless_asked() -> None:
    space = ConfigSpace(("stuff",), (1, 6), ())
    scores = [0.9, 0.88, 0.4, 0.38, 0.37, 0.2, 0.19, 0.1]
    assert chunk_cap(space, scores, False) == 8
    assert chunk_cap(space, scores, True) == 2
