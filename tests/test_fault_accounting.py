"""The fault suite's sample accounting (tests/fault_injection.py): lost, duplicated and rolled back by
design are told apart, against hand-built audits."""

from __future__ import annotations

from tests.fault_injection import compare_audits

# Rank -> 0-based batch -> sample ids, as callbacks/sample_audit.py records them.
REFERENCE = {
    0: {0: [1, 2], 1: [3, 4], 2: [5, 6], 3: [7, 8]},
    1: {0: [11, 12], 1: [13, 14], 2: [15, 16], 3: [17, 18]},
}


def test_an_exact_recovery_loses_nothing() -> None:
    assert compare_audits(REFERENCE, REFERENCE) == (0, 0, 0, True)


def test_a_rolled_back_batch_is_counted_apart_from_the_trained_ones() -> None:
    # Batch 2 was seen on both ranks and its update discarded by the rollback: 4 samples, none lost.
    assert compare_audits(REFERENCE, REFERENCE, rolled_back={2}) == (0, 0, 4, True)


def test_a_lost_batch_does_not_hide_behind_a_rollback() -> None:
    got = {0: {0: [1, 2], 1: [3, 4], 2: [5, 6]}, 1: dict(REFERENCE[1])}  # rank 0 never trained batch 3
    assert compare_audits(REFERENCE, got, rolled_back={2}) == (2, 0, 4, False)
    assert compare_audits(REFERENCE, got) == (2, 0, 0, False)


def test_a_batch_trained_twice_or_a_foreign_sample_is_duplicated() -> None:
    got = {0: {**REFERENCE[0], 3: [7, 1]}, 1: {**REFERENCE[1], 3: [17, 18, 99]}}
    # Rank 0: 8 is lost and 1 trained twice; rank 1: 99 is no reference sample.
    assert compare_audits(REFERENCE, got) == (1, 2, 0, False)


def test_a_kind_of_fault_split_over_groups_is_summed_on_one_line() -> None:
    """kill-2 and kill-2-again each report a "kill mid-step (2 processes)" row: the table adds them."""
    from tests.fault_injection import Row

    first = Row(faults=1, recovered=1, rolled_back=3, failures=["a"])
    second = Row(faults=2, recovered=0, lost=5, duplicated=1, rejected=1, hangs=1, failures=["b"])
    both = first + second
    assert (both.faults, both.recovered, both.lost, both.rolled_back) == (3, 1, 5, 3)
    assert (both.duplicated, both.rejected, both.hangs, both.failures) == (1, 1, 1, ["a", "b"])
    assert not both.ok() and Row(faults=1, recovered=1).ok()
