"""The usage ledger: prices, standard-token arithmetic, budget windows, the store's sums."""

from __future__ import annotations

import json
import math
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from droidpool import errors
from droidpool.config import Budget
from droidpool.core.budgets import Window, applies, cycle_start, due_warning, frees_at, projected
from droidpool.core.catalog import Catalog
from droidpool.core.ledger import Ledger, parse_time
from droidpool.core.pricing import Pricing, weighted_tokens
from droidpool.droid.protocol import Usage
from droidpool.store import MIGRATIONS, SqliteStore, TurnRow
from droidpool.store.base import LedgerQuery

FIXTURES = Path(__file__).parents[1] / "fixtures"
LISTED = json.loads((FIXTURES / "list_models_offline.json").read_text())  # droid 0.225.2, offline


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# --- prices -------------------------------------------------------------------------------------


def info(model_id: str) -> dict[str, object]:
    return next(m for m in LISTED if m["id"] == model_id)


def test_droid_lists_multipliers_for_factory_models_and_none_for_byok() -> None:
    factory = [m for m in LISTED if not m["isCustom"]]
    assert factory and all(isinstance(m["tokenMultiplier"], int | float) for m in factory)
    assert all("tokenMultiplier" not in m for m in LISTED if m["isCustom"])


def test_a_price_comes_from_the_config_then_droid_then_byok_free_else_none() -> None:
    pricing = Pricing({"claude-opus-5": 3.0, "gemini-*": 1.5, "custom:fake-echo-0": 0.5, "*-fast": 9.0})
    assert (pricing.price("claude-opus-5", info("claude-opus-5")).multiplier, "config") == (3.0, "config")
    glob = pricing.price("gemini-3.8-flash", info("gemini-3.8-flash"))
    assert (glob.multiplier, glob.source, glob.promo) == (1.5, "config", "50% Off")
    live = pricing.price("claude-sonnet-5", info("claude-sonnet-5"))
    assert (live.multiplier, live.source) == (0.8, "droid")
    assert pricing.price("claude-opus-4-8-fast", info("claude-opus-4-8-fast")).multiplier == 9.0  # glob over droid
    byok = pricing.price("custom:fake-paced-0", info("custom:fake-paced-0"))
    assert (byok.multiplier, byok.source, byok.byok) == (0.0, "byok", True)
    assert pricing.price("custom:fake-echo-0", info("custom:fake-echo-0")).multiplier == 0.5  # operator priced
    unknown = pricing.price("claude-next", {"id": "claude-next", "isCustom": False})
    assert (unknown.multiplier, unknown.source, unknown.priced) == (None, "unpriced", False)


def test_an_unpriced_factory_model_is_refused_unless_allowed() -> None:
    unknown = Pricing({}).price("claude-next", {"id": "claude-next"})
    with pytest.raises(errors.Forbidden) as info_:
        Pricing({}).check(unknown)
    assert info_.value.error_code == "model_unpriced" and info_.value.status == 403
    Pricing({}).check(unknown, key_allows_unpriced=True)
    Pricing({}, allow_unpriced=True).check(unknown)
    Pricing({}).check(Pricing({}).price("custom:mine", {"id": "custom:mine", "isCustom": True}))  # BYOK: free


def test_standard_tokens_weigh_cache_reads_and_keep_droids_credits_apart() -> None:
    pricing = Pricing({"m": 2.0}, cached_factor=0.1, usd_per_million={"m": 3.0})
    usage = Usage(input_tokens=1000, output_tokens=500, cache_read_tokens=10_000, cache_creation_tokens=200,
                  thinking_tokens=300)
    cost = pricing.cost(pricing.price("m", {"id": "m"}), usage)
    # thinking is a part of output: not counted again
    assert cost.standard_tokens == pytest.approx(2.0 * (1000 + 200 + 500 + 1000))
    assert cost.usd == pytest.approx(3.0 * 2700 / 1e6)
    assert cost.source == "config" and cost.factory_credits == 0
    reported = pricing.cost(pricing.price("m", {"id": "m"}), Usage(1000, 500, factory_credits=12345.0))
    assert reported.source == "droid_reported" and reported.factory_credits == 12345.0
    assert reported.standard_tokens == pytest.approx(3000)


def test_droid_usage_reads_factory_credits_and_rejects_nonsense() -> None:
    assert Usage.from_droid({"inputTokens": 5, "factoryCredits": 7.5}).factory_credits == 7.5
    for bad in (None, "7", -1, math.nan, math.inf, True):
        assert Usage.from_droid({"factoryCredits": bad}).factory_credits == 0.0
    assert "factory_credits" not in Usage(1, 2, factory_credits=3).to_json()  # clients see droid's counts only


usages = st.builds(Usage, *(st.integers(0, 10**7) for _ in range(5)), st.floats(0, 1e6))


@given(usages, usages, st.floats(0, 20), st.floats(0, 1))
def test_standard_tokens_are_additive_and_scale_with_the_multiplier(a: Usage, b: Usage, m: float, f: float) -> None:
    pricing = Pricing({"m": m}, cached_factor=f)
    price = pricing.price("m", {})
    both = pricing.cost(price, a + b).standard_tokens
    assert both == pytest.approx(pricing.cost(price, a).standard_tokens + pricing.cost(price, b).standard_tokens,
                                 rel=1e-9, abs=1e-6)
    assert both == pytest.approx(m * weighted_tokens(a + b, f), rel=1e-9, abs=1e-6)
    assert both >= 0


# --- windows -------------------------------------------------------------------------------------


def test_a_monthly_cycle_starts_on_its_day_and_clamps_to_short_months() -> None:
    assert cycle_start(ts("2026-03-20T10:00:00"), 15) == ts("2026-03-15T00:00:00")
    assert cycle_start(ts("2026-03-10T10:00:00"), 15) == ts("2026-02-15T00:00:00")
    assert cycle_start(ts("2026-03-15T00:00:00"), 15) == ts("2026-03-15T00:00:00")  # the start itself is in
    assert cycle_start(ts("2026-02-28T12:00:00"), 31) == ts("2026-02-28T00:00:00")  # Feb has no 31st
    assert cycle_start(ts("2026-02-27T12:00:00"), 31) == ts("2026-01-31T00:00:00")
    assert cycle_start(ts("2028-02-29T01:00:00"), 30) == ts("2028-02-29T00:00:00")  # a leap year
    assert cycle_start(ts("2027-01-03T00:00:00"), 5) == ts("2026-12-05T00:00:00")  # back over new year
    window = Window.parse("monthly:31")
    assert window.end(ts("2026-01-31T05:00:00")) == ts("2026-02-28T00:00:00")
    assert window.end(ts("2026-12-31T05:00:00")) == ts("2027-01-31T00:00:00")
    assert Window.parse("monthly").start(ts("2026-12-01T00:00:00")) == ts("2026-12-01T00:00:00")


def test_rolling_windows_and_their_spans() -> None:
    now = ts("2026-12-01T12:00:00")
    assert Window.parse("5h").start(now) == now - 5 * 3600
    assert Window.parse("7d").start(now) == now - 7 * 86400
    assert Window.parse("1.5h").span_s == 5400
    assert Window.parse("30d").bucket_s == 2592.0 and Window.parse("1h").bucket_s == 3.6
    assert Window.parse("monthly").bucket_s == 3600.0
    with pytest.raises(ValueError):
        Window.parse("weekly")


@given(st.lists(st.tuples(st.integers(0, 299), st.floats(0, 1000)), max_size=40), st.floats(1, 5000))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_a_rolling_window_frees_no_earlier_than_its_rows_age_out(rows: list[tuple[int, float]], limit: float) -> None:
    window = Window.parse("5h")  # 18 s buckets
    bucket = window.bucket_s
    now = 10_000_000.0
    # rows finished in the last 5 h, at bucket resolution
    buckets: dict[float, float] = {}
    for index, amount in rows:
        start = math.floor((now - window.span_s + index * 60) / bucket) * bucket  # type: ignore[operator]
        buckets[start] = buckets.get(start, 0.0) + amount
    used = math.fsum(buckets.values())
    at = frees_at(window, list(buckets.items()), limit, now)
    if used < limit:
        assert at == now
        return
    # at ``at`` every row of the buckets that had to go has aged out, and what is left is under the limit
    left = math.fsum(a for s, a in buckets.items() if s + bucket + window.span_s > at)  # type: ignore[operator]
    assert left < limit
    # and no later than needed: a moment earlier, what is still there is not under the limit
    before = math.fsum(a for s, a in buckets.items() if s + bucket + window.span_s > at - 1e-3)  # type: ignore[operator]
    assert before >= limit


def test_a_cycle_frees_at_its_end_and_projects_its_pace() -> None:
    window = Window.parse("monthly:1")
    now = ts("2026-12-11T00:00:00")  # 10 days into a 31-day cycle
    assert frees_at(window, [(0, 100.0)], 50, now) == ts("2027-01-01T00:00:00")
    assert projected(window, 100.0, 0, now) == pytest.approx(310.0)
    assert projected(Window.parse("5h"), 100.0, 40.0, now) == 160.0


def test_budget_scopes() -> None:
    assert applies(Budget("5h", 1), "team-a") == ""
    assert applies(Budget("5h", 1, key="*"), "team-a") == "team-a"
    assert applies(Budget("5h", 1, key="team-a"), "team-a") == "team-a"
    assert applies(Budget("5h", 1, key="team-b"), "team-a") is None


def test_warnings_fall_due_once_per_threshold() -> None:
    assert due_warning((0.8, 0.95), 0.5, 0) is None
    assert due_warning((0.8, 0.95), 0.85, 0) == 0.8
    assert due_warning((0.8, 0.95), 0.9, 0.8) is None
    assert due_warning((0.8, 0.95), 1.2, 0.8) == 0.95


def test_report_times() -> None:
    now = ts("2026-12-01T12:00:00")
    assert parse_time("2026-11-01", now) == ts("2026-11-01T00:00:00")
    assert parse_time("2026-11-01T05:00:00+01:00", now) == ts("2026-11-01T04:00:00")
    assert parse_time("7d", now) == now - 7 * 86400 and parse_time("90m", now) == now - 5400
    assert parse_time("1700000000", now) == 1700000000.0
    with pytest.raises(ValueError):
        parse_time("last tuesday", now)


# --- the store's ledger ---------------------------------------------------------------------------


def row(owner: str, model: str, usage: Usage, finished_at: float, standard: float, status: str = "completed",
        session: str = "s") -> TurnRow:
    return TurnRow(uuid.uuid4().hex, session, model, usage, finished_at - 1, owner, droid_model=model,
                   standard_tokens=standard, cost_source="config", multiplier=1.0, finished_at=finished_at,
                   status=status)


async def opened(path: Path) -> SqliteStore:
    store = SqliteStore(path, 3600)
    await store.open()
    return store


entries = st.lists(st.tuples(st.sampled_from(["", "a", "b"]), st.sampled_from(["m1", "m2"]), usages,
                             st.integers(0, 3 * 86400), st.booleans()), max_size=25)


@pytest.mark.anyio
@given(entries)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_ledger_sums_every_row_once_whatever_the_grouping(tmp_path: Path, rows: list) -> None:
    store = await opened(tmp_path / f"{uuid.uuid4().hex}.db")
    base = ts("2026-12-01T00:00:00")
    try:
        written = []
        for owner, model, usage, offset, failed in rows:
            await store.create(session := uuid.uuid4().hex, model, owner=owner)
            turn = row(owner, model, usage, base + offset, 2.0 * usage.output_tokens,
                       "failed" if failed else "completed", session)
            if failed:
                await store.fail_turn(turn)
            else:
                await store.complete_turn(turn, "h")
                await store.complete_turn(turn, "h")  # written twice: counted once
            written.append(turn)
        total = await store.ledger(LedgerQuery())
        expected = Usage()
        for turn in written:
            expected = expected + turn.usage
        if not written:
            assert total == []
            return
        assert total[0].turns == len(written) and total[0].failed == sum(1 for r in rows if r[4])
        assert total[0].usage.output_tokens == expected.output_tokens
        assert total[0].usage.cache_read_tokens == expected.cache_read_tokens
        assert total[0].standard_tokens == pytest.approx(2.0 * expected.output_tokens)
        for by in (("key",), ("model",), ("day",), ("key", "model"), ("day", "model"), ("status",)):
            groups = await store.ledger(LedgerQuery(by=by))
            assert sum(g.turns for g in groups) == len(written)
            assert sum(g.usage.input_tokens for g in groups) == expected.input_tokens
            assert sum(g.standard_tokens for g in groups) == pytest.approx(total[0].standard_tokens)
        days = {g.group[0] for g in await store.ledger(LedgerQuery(by=("day",)))}
        assert days <= {"2026-12-01", "2026-12-02", "2026-12-03", "2026-12-04"}
        mine = await store.ledger(LedgerQuery(owner="a"))
        assert (mine[0].turns if mine else 0) == sum(1 for r in rows if r[0] == "a")
        window = await store.ledger(LedgerQuery(since=base + 86400, until=base + 2 * 86400))
        assert (window[0].turns if window else 0) == sum(1 for r in rows if 86400 <= r[3] < 2 * 86400)
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_v4_ledger_is_upgraded_and_its_old_rows_say_their_cost_was_not_recorded(tmp_path: Path) -> None:
    path = tmp_path / "v4.db"
    db = sqlite3.connect(path)
    for version, script in enumerate(MIGRATIONS[:4]):
        db.executescript(f"BEGIN; {script} PRAGMA user_version = {version + 1}; COMMIT;")
    db.execute("INSERT INTO turns (turn_id, session_id, model, dialect, status, started_at, finished_at, "
               "input_tokens, output_tokens) VALUES ('old', 's', 'm', 'openai', 'completed', 1, 2, 10, 5)")
    db.commit()
    db.close()
    store = await opened(path)
    try:
        (group,) = await store.ledger(LedgerQuery(by=("model",)))
        assert group.group == ("m",) and group.usage.input_tokens == 10 and group.standard_tokens == 0
        cost_source = store._conn().execute("SELECT cost_source FROM turns").fetchone()[0]
        assert cost_source == "unrecorded"
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_key_over_its_budget_is_refused_with_when_it_frees(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s.db")
    now = ts("2026-12-01T12:00:00")
    try:
        for hours_ago, amount in ((4.5, 600.0), (2.0, 300.0), (0.5, 200.0)):
            await store.create(s := uuid.uuid4().hex, "m", owner="a")
            await store.complete_turn(row("a", "m", Usage(1, 1), now - hours_ago * 3600, amount, session=s), "h")
        budgets = (Budget("5h", 1000, key="a"), Budget("monthly", 5000), Budget("5h", 10, key="b"))
        ledger = Ledger(store, Catalog(list), Pricing({}), budgets, clock=lambda: now)
        with pytest.raises(errors.QuotaExceeded) as info_:
            await ledger.admit("a")
        # 1100 used; the 600 from 4.5 h ago ages out 30 min from now (within one 18 s bucket)
        assert 1800 <= info_.value.retry_after <= 1800 + 18  # type: ignore[operator]
        assert info_.value.error_code == "insufficient_quota" and info_.value.status == 429
        await ledger.admit("b")  # b's own budget is untouched, the service's has room
        states = {(s.budget.key, s.budget.window): s for s in await ledger.states(None)}
        assert states[("", "monthly")].used == 1100 and states[("a", "5h")].exhausted
        estimate = await ledger.estimate("custom:x", 100, "b")
        assert estimate["standard_tokens"] == 0  # BYOK: free
    finally:
        await store.close()


@given(st.lists(st.tuples(st.floats(0, 40 * 86400), st.floats(0, 1000), st.sampled_from(["a", "b"])), max_size=60),
       st.sampled_from(["5h", "7d", "30d", "monthly", "monthly:17"]), st.sampled_from(["", "*", "a"]))
def test_a_tally_counts_the_window_exactly_up_to_one_bucket_never_less(
        rows: list[tuple[float, float, str]], spec: str, key: str) -> None:
    from droidpool.core.budgets import Tally
    from droidpool.store.base import LedgerEntry

    now = ts("2026-12-20T15:30:00")
    tally = Tally(Budget(spec, 100, key=key))
    for seq, (age, amount, owner) in enumerate(rows):
        tally.add(LedgerEntry(seq, now - age, owner, amount, 0.0))
    window = Window.parse(spec)
    start, size = window.start(now), window.bucket_s
    for scope in {applies(tally.budget, owner) for _, _, owner in rows} - {None}:
        mine = [(now - age, amount) for age, amount, owner in rows if applies(tally.budget, owner) == scope]
        exact = sum(a for t, a in mine if t >= start)
        slack = sum(a for t, a in mine if start - size <= t < start)
        used = tally.state(scope, now).used  # type: ignore[arg-type]
        assert exact - 1e-6 <= used <= exact + slack + 1e-6
        if not window.rolling:
            assert used == pytest.approx(exact)  # cycles start on a bucket boundary


@pytest.mark.anyio
async def test_budgets_follow_rows_another_process_writes_to_the_same_store(tmp_path: Path) -> None:
    ours, theirs = await opened(tmp_path / "s.db"), await opened(tmp_path / "s.db")
    now = ts("2026-12-01T12:00:00")
    try:
        ledger = Ledger(ours, Catalog(list), Pricing({}), (Budget("5h", 1000),), clock=lambda: now)
        await ledger.admit("a")
        for amount in (400.0, 700.0):
            await theirs.create(s := uuid.uuid4().hex, "m", owner="b")
            await theirs.complete_turn(row("b", "m", Usage(1, 1), now - 60, amount, session=s), "h")
        async with anyio.create_task_group() as tg:  # concurrent checks fold each row once
            for _ in range(5):
                tg.start_soon(states_of, ledger)
        (state,) = await ledger.states("a")
        assert state.used == 1100
        with pytest.raises(errors.QuotaExceeded):
            await ledger.admit("a")
        ledger.reconfigure(Pricing({}), (Budget("5h", 5000),), (0.8,))
        await ledger.admit("a")  # new budgets, rebuilt from the store
        assert (await ledger.states(None))[0].used == 1100
    finally:
        await ours.close()
        await theirs.close()


async def states_of(ledger: Ledger) -> None:
    await ledger.states("a")


def test_a_window_left_exactly_at_its_limit_is_still_used_up() -> None:
    """Found by hypothesis: subtracting 255 from 256.319... left a hair under the limit."""
    window = Window.parse("5h")
    buckets = [(10_000_000.0 - window.span_s, 255.0), (10_000_000.0 - window.span_s + 54, 1.3192554398980576)]
    at = frees_at(window, buckets, 1.3192554398980576, 10_000_000.0)
    assert at == buckets[1][0] + window.bucket_s + window.span_s  # both buckets must go, not just the first
