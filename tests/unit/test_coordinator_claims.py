"""The takeover claim's rule (coordinator.claims.judge): the latest claim wins; a claimant
fences the recent earlier ones."""

from __future__ import annotations

from fleetplane.coordinator.claims import Claim, judge

NOW = 1_800_000_000_000


def test_the_latest_claim_wins_and_fences_the_recent_earlier_ones() -> None:
    old = Claim("a-1", 0, NOW - 3_600_000)  # an hour ago: fenced or gone long since
    b, c = Claim("b-2", 1, NOW - 200), Claim("c-3", 2, NOW - 100)
    claims = [old, b, c]
    earlier, winner = judge(claims, c)
    assert winner is None and earlier == [b]
    earlier, winner = judge(claims, b)
    assert winner == c  # b stands down


def test_a_duplicate_of_ones_own_claim_is_not_a_rival() -> None:
    mine, copy = Claim("b-2", 4, NOW), Claim("b-2", 5, NOW)
    assert judge([mine, copy], mine) == ([], None)




def test_claimants_before_the_previous_holders_claim_were_settled_by_it() -> None:
    a, b, c, d = (Claim(e, i, NOW - 1000 + i) for i, e in enumerate(["a", "b", "c", "d"]))
    # c took over from b (b's ticks named it; b ticked only after its own check settled a)
    assert judge([a, b, c], c, previous="b") == ([], None)
    # d claimed after c, with b as the holder it saw: c may have passed its check unseen
    assert judge([a, b, c, d], d, previous="b") == ([c], None)
    # no claim of the previous holder in sight: every recent earlier claim
    assert judge([a, b, c, d], d, previous=None) == ([a, b, c], None)
