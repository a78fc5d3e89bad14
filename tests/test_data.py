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
    with pytest.raises(KpcError, match="synthetic takes no path or options"):
        parse_data_spec("synthetic:/some/folder")
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


def _imagefolder_of_fashion_mnist(root, modes=("L", "RGBA", "P", "CMYK", "RGB")):
    """Real Fashion-MNIST images saved as an imagefolder, one file per PIL mode a user's folder may hold."""
    from PIL import Image

    from kpc.data import fashion_mnist_arrays

    images, labels = fashion_mnist_arrays(parse_data_spec("fashion-mnist").path, "val")
    for index, mode in enumerate(modes * 2):
        folder = root / "train" / f"class{labels[index]}"
        folder.mkdir(parents=True, exist_ok=True)
        suffix = {"P": "bmp", "CMYK": "jpg"}.get(mode, "png")
        Image.fromarray(images[index]).convert(mode).save(folder / f"{index}.{suffix}")
    return root


@needs_fashion_mnist
@pytest.mark.parametrize("channels", [1, 3])
def test_an_imagefolder_reads_every_image_mode_as_the_models_channels(tmp_path, channels):
    spec = parse_data_spec(f"imagefolder:{_imagefolder_of_fashion_mnist(tmp_path)}")
    data = load_dataset(spec, "train", (channels, 32, 32))
    shapes = {tuple(data.dataset[i][0].shape) for i in range(len(data.dataset))}
    assert shapes == {(channels, 32, 32)} and len(data.dataset) == 10


@needs_fashion_mnist
def test_an_unreadable_image_or_a_channel_count_no_image_has_is_one_line(tmp_path):
    from kpc.cli._common import _first_line

    spec = parse_data_spec(f"imagefolder:{_imagefolder_of_fashion_mnist(tmp_path)}")
    with pytest.raises(KpcError, match=r"read as 1 \(grayscale\) or 3 \(RGB\) channels, but the model takes 2"):
        load_dataset(spec, "train", (2, 32, 32))
    empty = next((tmp_path / "train").iterdir()) / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(KpcError, match=r"empty\.jpg is not an image kpc can read"):
        list(calibration_batches(spec, (3, 32, 32), batches=4, batch_size=4))
    # from a loader's worker process, torch re-raises it under "Caught KpcError in DataLoader worker process 0."
    with pytest.raises(KpcError) as caught:
        list(calibration_batches(spec, (3, 32, 32), batches=4, batch_size=4, workers=1))
    assert _first_line(caught.value).startswith(f"{empty} is not an image kpc can read"), str(caught.value)
