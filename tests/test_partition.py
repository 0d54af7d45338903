"""Partitions of one data set over devices (exact counts, seeded) and the digits federation."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from fedsync import datasets, partition
from fedsync.datasets import digits_federation, load_digits, split_devices
from fedsync.partition import by_group, dirichlet, iid, natural, partition_report
from fedsync.synthetic import union


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_docstring_examples_run() -> None:
    for module, examples in ((partition, 7), (datasets, 6)):
        result = doctest.testmod(module)
        assert (module.__name__, result.failed, result.attempted) == (module.__name__, 0, examples)


def _covers_once(parts, n_samples) -> bool:
    joined = np.concatenate(parts)
    return len(joined) == n_samples and np.array_equal(np.sort(joined), np.arange(n_samples))


def test_digits_is_scikit_learns_copy(digits) -> None:
    x, y = digits
    assert x.shape == (1797, 64) and x.dtype == np.float32 and y.dtype == np.int64
    assert (float(x.min()), float(x.max())) == (0.0, 1.0)
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_iid_sizes_differ_by_at_most_one_and_cover_every_sample(digits) -> None:
    _, y = digits
    parts = iid(y, 10, seed=0)
    assert [len(p) for p in parts] == [180] * 7 + [179] * 3
    assert _covers_once(parts, 1797)
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid(y, 10, seed=0)))  # pure in the seed
    assert not np.array_equal(parts[0], iid(y, 10, seed=1)[0])


def test_dirichlet_counts_are_exact_for_a_seed(digits) -> None:
    _, y = digits
    half = dirichlet(y, 10, alpha=0.5, seed=0)
    tenth = dirichlet(y, 10, alpha=0.1, seed=0)
    assert [len(p) for p in half] == [136, 156, 317, 188, 200, 197, 116, 244, 135, 108]
    assert [len(p) for p in tenth] == [125, 138, 384, 106, 118, 319, 282, 133, 123, 69]
    assert _covers_once(half, 1797) and _covers_once(tenth, 1797)
    report = partition_report(y, tenth)
    assert report.histogram[9].tolist() == [66, 0, 3, 0, 0, 0, 0, 0, 0, 0]
    assert report.histogram.sum(axis=0).tolist() == np.bincount(y).tolist()
    # Skew grows as alpha falls: classes a device holds at least 5 samples of, summed over devices.
    held = lambda parts: int((partition_report(y, parts).histogram >= 5).sum())  # noqa: E731
    assert (held(iid(y, 10, 0)), held(half), held(tenth)) == (100, 66, 35)


def test_dirichlet_gives_every_device_min_size_or_says_it_cannot() -> None:
    labels = np.repeat(np.arange(2), 6)
    parts = dirichlet(labels, 4, alpha=0.05, seed=3, min_size=2)
    assert min(len(p) for p in parts) >= 2 and _covers_once(parts, 12)
    with pytest.raises(ValueError) as err:
        dirichlet(labels, 6, alpha=0.01, seed=0, min_size=2, max_tries=5)
    assert str(err.value) == ("no Dirichlet(0.01) split in 5 draws gave every one of 6 devices 2 samples: "
                              "raise alpha or lower the number of devices")
    with pytest.raises(ValueError) as err:
        dirichlet(labels, 7, alpha=1.0, seed=0)
    assert str(err.value) == "cannot give 7 devices 2 samples each from 12"
    with pytest.raises(ValueError) as err:
        dirichlet(labels, 2, alpha=0.0, seed=0)
    assert str(err.value) == "alpha must be a finite number > 0, got 0.0"


def test_by_group_keeps_each_group_on_one_device() -> None:
    groups = np.arange(1797) % 7  # seven "writers"
    parts = by_group(groups, 3, seed=0)
    assert [len(p) for p in parts] == [770, 513, 514]
    assert [sorted(set(groups[p].tolist())) for p in parts] == [[1, 2, 6], [4, 5], [0, 3]]
    assert _covers_once(parts, 1797)
    assert [len(p) for p in natural(groups)] == [257] * 5 + [256] * 2
    with pytest.raises(ValueError) as err:
        by_group(groups, 8, seed=0)
    assert str(err.value) == "cannot split 7 groups over 8 devices"


def test_iid_refuses_more_devices_than_samples() -> None:
    with pytest.raises(ValueError) as err:
        iid(np.zeros(3), 4, seed=0)
    assert str(err.value) == "cannot split 3 samples over 4 devices"


def test_partition_report_table_and_plot(digits, tmp_path) -> None:
    _, y = digits
    report = partition_report(y, dirichlet(y, 10, alpha=0.5, seed=0))
    lines = report.table().splitlines()
    assert lines[0].split() == ["device", "samples", *map(str, range(10))]
    assert lines[1].split() == ["0", "136", "24", "3", "21", "1", "10", "0", "0", "47", "30", "0"]
    assert lines[-1].split() == ["total", "1797", "178", "182", "177", "183", "181", "182", "181", "179", "174", "180"]
    assert len(lines) == 12 and report.samples == [136, 156, 317, 188, 200, 197, 116, 244, 135, 108]
    path = tmp_path / "partition.png"
    report.plot(str(path), title="digits, Dirichlet(0.5)")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_labels_and_integer_ticks(digits, tmp_path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    _, y = digits
    seen = {}
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: seen.setdefault("fig", fig))
    partition_report(y, iid(y, 4, seed=0)).plot(str(tmp_path / "p.png"), title="iid")
    ax = seen["fig"].axes[0]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("iid", "device", "samples")
    assert ax.get_xticks().tolist() == [0, 1, 2, 3]
    assert all(float(t).is_integer() for t in ax.get_yticks())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [str(c) for c in range(10)]
    real_close(seen["fig"])


def test_digits_federation_splits_each_device_into_train_and_test() -> None:
    devices = digits_federation(10, "dirichlet", alpha=0.5, seed=0)
    assert [(d.num_train, len(d.y_test)) for d in devices] == [
        (109, 27), (125, 31), (254, 63), (150, 38), (160, 40), (158, 39), (93, 23), (195, 49), (108, 27), (86, 22)]
    x_train, _, x_test, _ = union(devices)
    assert (len(x_train), len(x_test)) == (1438, 359)
    assert [d.num_train for d in digits_federation(4, "iid", seed=0)] == [360, 359, 359, 359]
    with pytest.raises(ValueError) as err:
        digits_federation(4, "by_writer")
    assert str(err.value) == "partition 'by_writer' is not one of iid, dirichlet"


def test_split_devices_needs_two_samples_per_device() -> None:
    x, y = np.zeros((3, 2), np.float32), np.zeros(3, np.int64)
    with pytest.raises(ValueError) as err:
        split_devices(x, y, [np.array([0, 1]), np.array([2])])
    assert str(err.value) == "device 1 has 1 samples; each needs at least 2 (train and test)"
