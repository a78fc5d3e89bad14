"""Data specs on the real Fashion-MNIST files and their failure modes."""

from __future__ import annotations

import gzip

import pytest
import torch

from kpc.data import calibration_batches, load_dataset, parse_data_spec, read_idx
from kpc.errors import KpcError

from .conftest import needs_fashion_mnist


@needs_fashion_mnist
def test_fashion_mnist_adapts_to_model_input():
    spec = parse_data_spec("fashion-mnist")
    data = load_dataset(spec, "val", (3, 40, 40))
    image, label = data.dataset[0]
    assert image.shape == (3, 40, 40) and 0 <= int(label) < 10
    assert len(data.dataset) == 10_000 and data.num_classes == 10
    batches = list(calibration_batches(spec, (1, 28, 28), batches=3, batch_size=4))
    assert len(batches) == 3 and batches[0][0].shape == (4, 1, 28, 28) and batches[0][1].shape == (4,)
    # normalised: roughly zero mean over a batch of real images
    assert abs(float(torch.cat([b[0] for b in batches]).mean())) < 1.0


def test_synthetic_has_no_labels():
    batches = list(calibration_batches(parse_data_spec("synthetic"), (3, 16, 16), batches=2, batch_size=3))
    assert [b[0].shape for b in batches] == [(3, 3, 16, 16)] * 2 and batches[0][1] is None


def test_bad_data_specs(tmp_path):
    with pytest.raises(KpcError, match="does not exist"):
        parse_data_spec(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(KpcError, match="unknown data spec"):
        parse_data_spec("mnist")
    with pytest.raises(KpcError, match="no train-images"):
        load_dataset(parse_data_spec(f"fashion-mnist:{tmp_path}"), "train", (1, 28, 28))
    broken = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(broken, "wb") as handle:
        handle.write(b"\x00\x00\x08\x03\x00\x00\x00\x05")
    with pytest.raises(KpcError, match="not a readable IDX file"):
        read_idx(broken)


@needs_fashion_mnist
def test_training_data_subset_and_repeatable_augmentation():
    from kpc.data import native_input_size, training_data

    spec = parse_data_spec("fashion-mnist")
    assert native_input_size(spec) == (1, 28, 28)
    data = training_data(spec, (1, 28, 28), subset=500, seed=3)
    assert len(data.train) == 500 and len(data.val) == 100 and data.num_classes == 10
    first = data.train[7][0]
    torch.rand(10)  # unrelated randomness must not change the augmented image
    assert torch.equal(first, data.train[7][0])
    data.train.set_epoch(1)
    assert not torch.equal(first, data.train[7][0]) or not torch.equal(first, data.train[8][0])


def test_global_batches_split_one_permutation_over_ranks():
    from kpc.train.distributed import Context, GlobalBatches

    whole = list(GlobalBatches(50, 8, Context(0, 1), shuffle=True, seed=1))
    ranks = [list(GlobalBatches(50, 8, Context(r, 2), shuffle=True, seed=1)) for r in range(2)]
    assert len(whole) == 6 and all(len(b) == 4 for b in ranks[0] + ranks[1])
    assert [a + b for a, b in zip(ranks[0], ranks[1], strict=True)] == whole
