"""``LedgerStore``: the turns written, summed by group and read back in write order."""

from __future__ import annotations

import pytest

from droidpool.droid.protocol import Usage
from droidpool.store.base import LedgerQuery

from . import Clock, Opener, turn

pytestmark = pytest.mark.anyio


async def test_the_ledger_groups_and_follows_every_write_in_order(backend: tuple[Opener, Clock]) -> None:
    open_store, clock = backend
    ours, theirs = await open_store(), await open_store()
    rows = []
    for index, (store, owner) in enumerate([(ours, "a"), (theirs, "b"), (ours, "a"), (theirs, "a")]):
        session = f"s{index}"
        await store.create(session, "m", owner=owner)
        row = turn(session, Usage(10, 1, factory_credits=0.5), owner=owner, droid_model="custom:m-0",
                   standard_tokens=11.0 * (index + 1), cost_source="config", multiplier=1.0,
                   finished_at=clock.now + index * 86400)
        await (store.complete_turn(row, "h") if index != 2 else store.fail_turn(row))
        rows.append(row)
    by_key = {g.group[0]: g for g in await ours.ledger(LedgerQuery(by=("key",)))}
    assert by_key["a"].turns == 3 and by_key["a"].failed == 1 and by_key["b"].standard_tokens == 22.0
    assert by_key["a"].usage.factory_credits == 1.5
    days = await ours.ledger(LedgerQuery(by=("day", "model")))
    assert [g.group for g in days] == [("2027-01-15", "custom:m-0"), ("2027-01-16", "custom:m-0"),
                                       ("2027-01-17", "custom:m-0"), ("2027-01-18", "custom:m-0")]
    window = await ours.ledger(LedgerQuery(since=clock.now + 86400, until=clock.now + 3 * 86400, owner="a"))
    assert window[0].turns == 1
    buckets = await ours.ledger(LedgerQuery(by=("bucket",), bucket_s=86400.0))
    assert sum(g.turns for g in buckets) == 4
    entries = await theirs.ledger_entries(0, 0.0, 100)
    assert [e.standard_tokens for e in entries] == [11.0, 22.0, 33.0, 44.0]  # in write order
    assert [e.owner for e in entries] == ["a", "b", "a", "a"]
    later = await ours.ledger_entries(entries[1].seq, 0.0, 100)
    assert [e.standard_tokens for e in later] == [33.0, 44.0]
    assert await ours.ledger_entries(0, clock.now + 2 * 86400, 1) == [entries[2]]
