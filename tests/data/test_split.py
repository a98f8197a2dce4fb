"""The train/test split must equal scikit-learn's train_test_split, order included."""

import pytest
# Imported, not importorskip'd: the test extra installs scikit-learn, and a missing one must
# fail the suite rather than skip 57 checks of the split without a word.
from sklearn import model_selection

from crossdet_ray.data import DatasetError, NpyYoloDataset, split_files


@pytest.mark.parametrize("num_files", [2, 3, 4, 5, 7, 10, 11, 15, 23, 50, 97, 101, 1000, 9750])
@pytest.mark.parametrize("test_size,seed", [(0.2, 42), (0.25, 0), (0.3, 7), (0.1, 123)])
def test_split_equals_sklearn(num_files, test_size, seed):
    files = [f"frame_{i:05d}.npy" for i in range(num_files)]
    expected_train, expected_test = model_selection.train_test_split(
        files, test_size=test_size, random_state=seed)
    train, test = split_files(files, test_size=test_size, seed=seed)
    assert train == list(expected_train)
    assert test == list(expected_test)


def test_integer_test_size_equals_sklearn():
    files = list(range(20))
    assert split_files(files, test_size=3, seed=42) == tuple(
        list(part) for part in model_selection.train_test_split(files, test_size=3,
                                                                random_state=42))


def test_split_is_a_partition_with_the_test_side_rounded_up():
    files = list(range(11))
    train, test = split_files(files, 0.2, 42)
    assert len(test) == 3 and len(train) == 8  # ceil(0.2 * 11) = 3
    assert sorted(train + test) == files


@pytest.mark.parametrize("test_size", [0.0, 1.0, -0.1, 1.5, "0.2"])
def test_bad_test_size_raises(test_size):
    with pytest.raises(DatasetError, match="test_size"):
        split_files(list(range(10)), test_size, 42)


def test_one_file_is_too_few_to_split():
    with pytest.raises(DatasetError, match="too few"):
        split_files(["only.npy"], 0.2, 42)


def test_dataset_splits_follow_split_files(builder):
    stems = [f"f{i:03d}" for i in range(17)]
    for stem in reversed(stems):  # creation order must not matter: sorted by name
        builder.labelled(stem)
    builder.frame("unlabelled")  # not usable: takes no part in the split
    names = [f"{stem}.npy" for stem in stems]
    expected_train, expected_test = split_files(names, 0.2, 42)
    train = NpyYoloDataset(builder.root, split="train")
    test = NpyYoloDataset(builder.root, split="test")
    everything = NpyYoloDataset(builder.root, split="all")
    assert train.image_files == expected_train
    assert test.image_files == expected_test
    assert everything.image_files == names
    assert not set(train.image_files) & set(test.image_files)


def test_dataset_split_matches_sklearn_on_sorted_usable_frames(builder):
    for i in range(23):
        builder.labelled(f"img_{i}")  # names sort lexicographically: img_1, img_10, ...
    names = sorted(f"img_{i}.npy" for i in range(23))
    expected_train, expected_test = model_selection.train_test_split(
        names, test_size=0.2, random_state=42)
    assert NpyYoloDataset(builder.root, "train").image_files == expected_train
    assert NpyYoloDataset(builder.root, "test").image_files == expected_test
