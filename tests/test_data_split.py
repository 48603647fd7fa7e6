"""aax.data.split.stratified_split."""

from __future__ import annotations

from collections import Counter

import pytest

from aax.data import stratified_split


def test_partition_stratified_and_deterministic():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 2 + ["d"]
    train, val = stratified_split(labels, 0.2, seed=7)
    assert sorted(train + val) == list(range(len(labels)))
    assert not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)
    counts = Counter(labels[i] for i in val)
    assert counts == {"a": 10, "b": 6, "c": 1}  # d has one sample: it trains
    assert Counter(labels[i] for i in train)["c"] == 1
    assert stratified_split(labels, 0.2, seed=7) == (train, val)
    assert stratified_split(labels, 0.2, seed=8) != (train, val)


def test_every_class_with_two_samples_on_both_sides():
    labels = ["x", "x", "y", "y", "y", "z"] + ["w"] * 40
    for fraction in (0.01, 0.5, 0.99):
        for seed in range(5):
            train, val = stratified_split(labels, fraction, seed)
            for cls in ("x", "y", "w"):
                assert any(labels[i] == cls for i in train)
                assert any(labels[i] == cls for i in val)


def test_a_class_split_does_not_depend_on_other_classes():
    base = ["a"] * 20
    _, val_alone = stratified_split(base, 0.25, seed=3)
    _, val_mixed = stratified_split(base + ["b"] * 9, 0.25, seed=3)
    assert [i for i in val_mixed if i < 20] == val_alone


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_fraction_must_be_open_interval(fraction):
    with pytest.raises(ValueError):
        stratified_split(["a", "a"], fraction, 0)
