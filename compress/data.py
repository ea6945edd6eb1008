"""Every data source behind one function, `load_data`, which returns a `Dataset` of stratified splits.

Sources:
- ``cifar10-mini``: a class-balanced CIFAR-10 subset shipped inside the package (no network, no extra files).
- ``cifar10``: the full set, from a class-folder copy (``data_dir`` or $COMPRESS_CIFAR10_DIR), else Keras' download.
- ``npz:PATH``: arrays saved with np.savez: x_train, y_train, x_test, y_test (x_val, y_val and class_names
  optional), read as `dataset_from_arrays` reads arrays given from Python.
- ``folder:PATH``: class folders, either ``PATH/train/<class>/`` + ``PATH/test/<class>/`` (a ``val/`` folder beside
  them is the validation split; ``train/`` + ``val/`` alone, the layout of many published sets, take ``val/`` as the
  test split) or ``PATH/<class>/``. A class folder's subfolders are read too, as Keras' image_dataset_from_directory
  reads them.

Decoded images are cached as .npz under $COMPRESS_CACHE_DIR (default ~/.cache/compress), keyed on the source files'
names, sizes and modification times, so a second load reads one file instead of decoding thousands.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tarfile
import threading
import time
import unicodedata
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from compress.errors import DataError, first_line, listed

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_DIR_ENV = "COMPRESS_CIFAR10_DIR"
CACHE_DIR_ENV = "COMPRESS_CACHE_DIR"
KNOWN_SOURCES = ("cifar10-mini", "cifar10", "folder:PATH", "npz:PATH")
# The arrays an npz: file holds, as np.savez writes what keras.datasets' load_data() returns (x_val, y_val optional).
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VALIDATION_FOLDERS = ("val", "valid", "validation")  # a folder of one of these names beside train/
MINI_ARCHIVE = "cifar10_mini.zip"
PREFETCH_BATCHES = 2  # batches made ahead of training: one takes ~7 ms to augment, a training step 100+ ms
# A single-folder set is split into train/test with this fixed seed, so that --seed changes the
# validation split and training order but never which images are held out for testing.
TEST_SPLIT_SEED = 1234
# How 0-255 pixels become a model's input: (scale, offset). "raw" is for models that rescale inside themselves.
INPUT_RANGES = {"unit": (1 / 255, 0.0), "raw": (1.0, 0.0), "symmetric": (2 / 255, -1.0)}
PROGRESS_MIN_IMAGES = 5000  # decoding fewer takes seconds: nothing said
MAX_IMAGE_SIDE = 4096  # --image-size beyond this asks for more memory than any image classifier here needs
# Part of the decoded-image cache key: raise it when decoding changes, so that no cache holds the old decoding.
DECODER_VERSION = 2  # 2: 16-bit images scaled to 8 bits (they were clipped)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images as uint8 NHWC arrays and integer labels, already split; `pipeline` makes tf.data from them."""

    source: str
    class_names: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    seed: int = 0
    input_range: str = "unit"  # what the model takes: see INPUT_RANGES
    # What the folder decided: where the validation and test splits came from, unreadable images left out.
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        for split in ("train", "val", "test"):  # the images every technique normalizes from 0-255 pixels
            images, labels = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
                raise DataError(f"x_{split} must be uint8 images (N, H, W, C); dataset_from_arrays takes other pixel "
                                "types and shapes")
            if len(images) != len(labels):
                raise DataError(f"x_{split} holds {len(images):,} images but y_{split} {len(labels):,} labels")
        if self.input_range not in INPUT_RANGES:
            raise DataError(f"input range must be one of {', '.join(INPUT_RANGES)}, got {self.input_range!r}")

    def with_input_range(self, input_range: str) -> "Dataset":
        """The same images, handed to models in `input_range` (raw 0-255 pixels, [0, 1] or [-1, 1])."""
        return dataclasses.replace(self, input_range=input_range)

    def with_channels(self, channels: int) -> "Dataset":
        """The same images with `channels` channels: RGB made grey as PIL's convert("L") does (ITU-R 601-2 luma),
        grey repeated into RGB."""
        if channels == self.input_shape[2]:
            return self
        if (self.input_shape[2], channels) not in ((3, 1), (1, 3)):
            raise DataError(f"cannot turn {self.input_shape[2]}-channel images into {channels}-channel ones")
        converted = {f"x_{name}": _grey(images) if channels == 1 else np.repeat(images, 3, axis=-1)
                     for name in ("train", "val", "test") for images in [self.split(name)[0]]}
        return dataclasses.replace(self, **converted)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The raw (uint8 images, int64 labels) of 'train', 'val' or 'test'."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def normalized(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A split as float32 images in the model's input range ([0, 1] unless told otherwise)."""
        x, y = self.split(name)
        return normalize(x, self.input_range), y

    def describe(self) -> dict:
        """JSON-ready summary: source, classes, input shape and images per split."""
        return {
            "source": self.source,
            "classes": list(self.class_names),
            "input_shape": list(self.input_shape),
            "counts": {name: int(len(self.split(name)[1])) for name in ("train", "val", "test")},
            "seed": self.seed,
            "input_range": self.input_range,
            **({"notes": list(self.notes)} if self.notes else {}),
        }

    def fingerprint(self) -> str:
        """A digest of the class names, images and labels of every split: run folders are keyed on it, so that a
        rerun after the images changed (same folder, other contents) redoes the work instead of reusing it."""
        digest = hashlib.sha256("\n".join(self.class_names).encode())
        for name in ("train", "val", "test"):
            for array in self.split(name):
                digest.update(f"{name}|{array.dtype}|{array.shape}".encode())
                digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()[:16]

    def pipeline(self, name: str, batch_size: int = 64, *, shuffle: bool = False, augment: bool = False):
        """A tf.data pipeline of (normalised images, labels): shuffled and augmented on request, prefetched."""
        from compress.keras import tf

        x, y = self.split(name)
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if shuffle:
            ds = ds.shuffle(len(x), seed=self.seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size)
        if augment:
            ds = ds.map(_augment_fn(self.input_shape, self.seed))
        scale, offset = INPUT_RANGES[self.input_range]
        ds = ds.map(lambda images, labels: (tf.cast(images, tf.float32) * scale + offset, labels))
        # A fixed prefetch instead of tf.data's autotuning: with autotuning on, `fit` returned long after its last
        # epoch had ended (its iterators' teardown waits on the tuner; figures in the README's history).
        options = tf.data.Options()
        options.autotune.enabled = False
        return ds.prefetch(PREFETCH_BATCHES).with_options(options)


def _grey(images: np.ndarray) -> np.ndarray:
    """uint8 RGB images as uint8 grey ones, in PIL's integer arithmetic for convert("L")."""
    weighted = images.astype(np.uint32) @ np.array([19595, 38470, 7471], np.uint32)
    return ((weighted + 0x8000) >> 16).astype(np.uint8)[..., None]


def normalize(images: np.ndarray, input_range: str = "unit") -> np.ndarray:
    scale, offset = INPUT_RANGES[input_range]
    return images.astype(np.float32) * np.float32(scale) + np.float32(offset)


def pixel_values(input_range: str) -> np.ndarray:
    """The 256 values an 8-bit pixel takes in `input_range`, as float32."""
    return normalize(np.arange(256, dtype=np.uint8), input_range)


def _augment_fn(input_shape: tuple[int, int, int], seed: int) -> Callable:
    """Random horizontal flip and a shift of up to 1/8 of the image (reflect-padded), drawn per image.

    Works on whole batches: one gather per axis instead of a per-image map, which took about twice as long.
    """
    from compress.keras import tf

    height, width, _ = input_shape
    pad = max(1, height // 8)
    generator = tf.random.Generator.from_seed(seed)

    def augment(images, labels):
        count = tf.shape(images)[0]
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        offsets = generator.uniform([count, 2], 0, 2 * pad + 1, dtype=tf.int32)
        rows = offsets[:, :1] + tf.range(height)[None, :]
        columns = offsets[:, 1:] + tf.range(width)[None, :]
        flipped = generator.uniform([count, 1], 0, 2, dtype=tf.int32) > 0
        columns = tf.where(flipped, columns[:, ::-1], columns)  # reading columns backwards mirrors the image
        shifted = tf.gather(padded, rows, axis=1, batch_dims=1)
        return tf.gather(shifted, columns, axis=2, batch_dims=1), labels

    return augment


def load_data(
    source: str = "cifar10-mini",
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    image_size: tuple[int, int] | None = None,
    cache_dir: str | os.PathLike | None = None,
    skip_unreadable: bool = False,
    log: Callable[[str], None] | None = None,
) -> Dataset:
    """Load a data source and split it: validation is stratified from the training images, never the test ones.
    Decoding a folder the cache does not hold yet is said through `log`, with progress on a large one. Images
    that cannot be read refuse the folder, naming them, unless `skip_unreadable` leaves them out (in the notes)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must be between 0 and 1, got {test_fraction}")
    if image_size is not None and (len(image_size) != 2 or not all(1 <= side <= MAX_IMAGE_SIDE for side in image_size)):
        raise DataError(f"image size must be two integers from 1 to {MAX_IMAGE_SIDE} (height, width), got {image_size}")
    cache = Path(cache_dir or os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "compress")

    notes = []
    if source == "cifar10-mini":
        tree = _zip_tree(resources.files("compress") / "datasets" / MINI_ARCHIVE)
        raw = _decode_cached(tree, image_size, cache, skip_unreadable, log)
    elif source == "cifar10":
        folder = data_dir or os.environ.get(CIFAR10_DIR_ENV)
        if folder:
            tree, notes = _folder_tree(Path(folder), test_fraction)
            raw = _decode_cached(tree, image_size, cache, skip_unreadable, log)
            if raw.class_names != CIFAR10_CLASSES:
                raise DataError(f"{folder} does not hold the CIFAR-10 classes ({', '.join(CIFAR10_CLASSES)})")
        else:
            raw = _download_cifar10(image_size)
    elif source.startswith("folder:"):
        if not source[len("folder:"):].strip():
            raise DataError("folder: needs the path of your image folder, e.g. --data folder:/data/flowers")
        if data_dir is not None:
            raise DataError("--data-dir applies to the cifar10 source; for folder:PATH the path is in the name")
        tree, notes = _folder_tree(Path(source[len("folder:"):]), test_fraction)
        raw = _decode_cached(tree, image_size, cache, skip_unreadable, log)
    elif source.startswith("npz:"):
        if image_size is not None:
            raise DataError("--image-size applies to image files; save the arrays at the size the model takes")
        return _npz_dataset(source, val_fraction=val_fraction, seed=seed)
    else:
        raise DataError(f"unknown data source {source!r}; known sources: {', '.join(KNOWN_SOURCES)}")
    if raw.unreadable:
        notes.append(f"left out {len(raw.unreadable):,} unreadable image(s): "
                     f"{listed(list(raw.unreadable), shown=3, separator='; ')}")
    return _split_dataset(source, raw, val_fraction, seed, notes)


def _split_dataset(source: str, raw: _Decoded, val_fraction: float, seed: int, notes: list[str],
                   classes: str = "class folders") -> Dataset:
    """The Dataset of a source's images: validation stratified from the training images unless the source has
    its own. `classes` names what the source's classes are, for the refusal of a single one."""
    if len(raw.class_names) < 2:
        raise DataError(f"{source} has {len(raw.class_names)} class ({', '.join(raw.class_names)}); a classifier "
                        f"needs two or more {classes}")
    if raw.val is None:
        train_idx, val_idx = stratified_split(raw.y_train, val_fraction, seed, raw.class_names)
        x_val, y_val = raw.x_train[val_idx], raw.y_train[val_idx]
    else:  # the user's own validation images; both shuffled as a split's are (a check on the first few sees all)
        rng = np.random.default_rng(seed)
        train_idx, val_idx = rng.permutation(len(raw.y_train)), rng.permutation(len(raw.val[1]))
        x_val, y_val = raw.val[0][val_idx], raw.val[1][val_idx]
    return Dataset(source=source, class_names=raw.class_names, x_train=raw.x_train[train_idx],
                   y_train=raw.y_train[train_idx], x_val=x_val, y_val=y_val, x_test=raw.x_test, y_test=raw.y_test,
                   seed=seed, notes=tuple(notes))


def dataset_from_arrays(x_train, y_train, x_test, y_test, *, x_val=None, y_val=None, class_names=None,
                        val_fraction: float = 0.1, seed: int = 0, source: str = "arrays") -> Dataset:
    """A Dataset of images held in arrays, as keras.datasets' load_data() gives them. Images are (N, H, W, C) with
    1 or 3 channels, or (N, H, W) grey: uint8 pixels, or numbers in 0-255, [0, 1] or [-1, 1] (which range is
    decided on all the splits' pixels together, and said in the notes). Labels are class indices, (N,) or (N, 1),
    or one-hot rows. `class_names` defaults to the indices as text. Validation is stratified from the training
    images (`val_fraction`, `seed`) unless x_val and y_val are given."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    if (x_val is None) != (y_val is None):
        raise DataError("give x_val and y_val together, or neither (validation is then split from the training set)")
    given = {"train": (x_train, y_train), "test": (x_test, y_test), **({"val": (x_val, y_val)} if x_val is not None
                                                                        else {})}
    images, note = _pixels({split: x for split, (x, _) in given.items()})
    labels, label_notes = {}, []
    for split, (_, y) in given.items():
        labels[split], one_hot = _class_indices(y, f"y_{split}", len(images[split]))
        if one_hot:
            label_notes.append(f"y_{split}")
    count = 1 + max(int(y.max()) for y in labels.values())
    names = tuple(str(index) for index in range(count)) if class_names is None else tuple(map(str, class_names))
    if len(names) < count:
        raise DataError(f"the labels go up to {count - 1} but {len(names)} class names are given")
    for split, y in labels.items():
        missing = [names[index] for index in range(len(names)) if not (y == index).any()]
        if missing and split != "val":
            raise DataError(f"class(es) {listed(missing)} have no {split} images")
    notes = [note] if note else []
    if label_notes:
        notes.append(f"labels: {', '.join(label_notes)} one-hot, read as class indices")
    raw = _Decoded(images["train"], labels["train"], images["test"], labels["test"], names,
                   (images["val"], labels["val"]) if "val" in images else None)
    return _split_dataset(source, raw, val_fraction, seed, notes, classes="classes")


def _pixels(arrays: dict) -> tuple[dict, str | None]:
    """({split: uint8 NHWC images}, a line saying which range float or integer pixels were read in, or None for
    uint8 ones)."""
    shaped = {}
    for split, x in arrays.items():
        x = np.asarray(x)
        x = x[..., None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[-1] not in (1, 3) or len(x) == 0:
            raise DataError(f"x_{split} must hold images, (N, H, W) or (N, H, W, C) with 1 or 3 channels; got an "
                            f"array of shape {tuple(x.shape)}")
        if x.dtype != np.uint8 and not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise DataError(f"x_{split} holds {x.dtype} values; pass pixels as numbers")
        shaped[split] = x
    if len({x.shape[1:] for x in shaped.values()}) > 1:
        raise DataError("the splits' images differ in shape: " + ", ".join(f"x_{split} {x.shape[1:]}"
                                                                           for split, x in shaped.items()))
    if len({x.dtype == np.uint8 for x in shaped.values()}) > 1:  # one range decided for all would misread some
        raise DataError("the splits' images differ in type: " + ", ".join(f"x_{split} {x.dtype}"
                                                                          for split, x in shaped.items())
                        + "; pass them all as uint8 pixels or all in the same range")
    if all(x.dtype == np.uint8 for x in shaped.values()):
        return shaped, None
    low = min(float(x.min()) for x in shaped.values())
    high = max(float(x.max()) for x in shaped.values())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise DataError("the images hold NaN or infinite values")
    for name, (start, end), (scale, offset) in (("[0, 1]", (0, 1), (255, 0)), ("[-1, 1]", (-1, 1), (127.5, 127.5)),
                                                ("0-255", (0, 255), (1, 0))):
        if start <= low and high <= end:
            converted = {split: np.clip(np.round(x.astype(np.float64) * scale + offset), 0, 255).astype(np.uint8)
                         for split, x in shaped.items()}
            return converted, (f"pixels: {low:g} to {high:g}, read as the range {name}"
                               + (" and scaled to 0-255" if name != "0-255" else ""))
    raise DataError(f"the images hold values from {low:g} to {high:g}; pass pixels as uint8, or as numbers in "
                    "0-255, [0, 1] or [-1, 1]")


def _class_indices(y, name: str, count: int) -> tuple[np.ndarray, bool]:
    """(labels as int64 class indices, whether they were one-hot rows)."""
    y = np.asarray(y)
    one_hot = y.ndim == 2 and y.shape[1] > 1
    if one_hot:
        if not (np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()):
            raise DataError(f"{name} has rows of {y.shape[1]} values that are not one-hot; pass class indices")
        y = y.argmax(axis=1)
    elif y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != count:
        raise DataError(f"{name} must hold one label per image ({count:,}); got an array of shape {tuple(y.shape)}")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and (y == np.round(y)).all())):
        raise DataError(f"{name} must hold class indices (integers); got {y.dtype} values")
    if (y < 0).any():
        raise DataError(f"{name} holds negative labels; pass class indices from 0")
    return y.astype(np.int64), one_hot


def _npz_dataset(source: str, *, val_fraction: float, seed: int) -> Dataset:
    path = Path(source[len("npz:"):])
    if not path.is_file():
        raise DataError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with np.load(path, allow_pickle=False) as saved:
            missing = [key for key in NPZ_KEYS if key not in saved]
            if missing:
                raise DataError(f"{path} lacks {', '.join(missing)}; save np.savez(path, x_train=..., y_train=..., "
                                "x_test=..., y_test=...)")
            arrays = {key: saved[key] for key in (*NPZ_KEYS, "x_val", "y_val", "class_names") if key in saved}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as an .npz file of arrays: {first_line(exc)}") from None
    return dataset_from_arrays(**arrays, val_fraction=val_fraction, seed=seed, source=source)


def sample_image_sizes(source: str, *, data_dir: str | os.PathLike | None = None, test_fraction: float = 0.2,
                       per_class: int = 5, **_load_arguments) -> set[tuple[int, int]]:
    """(height, width) of the first `per_class` training images of each class of a source, read from their headers
    without decoding them (an empty set where none can be read: loading names the problem)."""
    from PIL import Image

    if source == "cifar10-mini":
        tree = _zip_tree(resources.files("compress") / "datasets" / MINI_ARCHIVE)
    elif source == "cifar10" and not (data_dir or os.environ.get(CIFAR10_DIR_ENV)):
        return {(32, 32)}  # Keras' download
    elif source == "cifar10" or source.startswith("folder:"):
        folder = source[len("folder:"):] if source.startswith("folder:") else (data_dir or os.environ[CIFAR10_DIR_ENV])
        tree, _ = _folder_tree(Path(folder), test_fraction)
    else:
        return set()
    sizes = set()
    for entries in tree["train"].values():
        for name, _, _, read in entries[:per_class]:
            try:
                with Image.open(io.BytesIO(read())) as image:
                    sizes.add((image.height, image.width))
            except Exception:  # noqa: BLE001 - an unreadable image is named by load_data, with its reason
                continue
    return sizes


def stratified_split(labels: np.ndarray, fraction: float, seed: int, class_names=()) -> tuple[np.ndarray, np.ndarray]:
    """Split indices so that `fraction` of every class goes to the second part; both parts are shuffled."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < 2:
            name = class_names[label] if len(class_names) > label else label
            raise DataError(f"class {name!r} has {len(members)} training image(s); at least 2 are needed to split")
        take = min(len(members) - 1, max(1, round(len(members) * fraction)))
        second.append(members[:take])
        first.append(members[take:])
    return rng.permutation(np.concatenate(first)), rng.permutation(np.concatenate(second))


# A tree is {split: {class: [(name, size, mtime, read_bytes)]}}; its listing alone makes the cache key.
Entry = tuple[str, int, float, Callable[[], bytes]]
Tree = dict[str, dict[str, list[Entry]]]


def _folder_tree(root: Path, test_fraction: float) -> tuple[Tree, list[str]]:
    """(tree of the folder's splits, lines saying where the validation and test splits come from where the
    layout decided it, and which files were not read as images)."""
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        archive = zipfile.is_zipfile(root) or tarfile.is_tarfile(root)
        raise DataError(f"data folder {root} is " + ("an archive: unpack it and pass the folder it holds" if archive
                                                     else "not a folder"))
    root, wrappers = _inside_wrapper_folders(root)
    val_dir = next((root / name for name in VALIDATION_FOLDERS if (root / name).is_dir()), None)
    if (root / "train").is_dir() or (root / "test").is_dir() or val_dir is not None:
        if not (root / "train").is_dir():
            raise DataError(f"{root} has a {'test' if (root / 'test').is_dir() else val_dir.name}/ folder but no "
                            "train/ folder beside it")
        if (root / "test").is_dir():
            splits = {"train": root / "train", "test": root / "test", **({"val": val_dir} if val_dir else {})}
            note = (f"validation split: the images of {val_dir.name}/ (--val-fraction does not apply)"
                    if val_dir else "")
        elif val_dir is not None:
            splits = {"train": root / "train", "test": val_dir}
            note = (f"test split: the images of {val_dir.name}/ (there is no test/ folder); validation split: "
                    "part of train/ (--val-fraction)")
        else:
            raise DataError(f"{root} has a train/ folder but no test/ (or val/) folder beside it")
        listed_splits = {split: _class_folders(folder) for split, folder in splits.items()}
        tree = {split: classes for split, (classes, _) in listed_splits.items()}
        ignored = sum((other for _, other in listed_splits.values()), Counter())
        for split in tree:
            if split == "train":
                continue
            only_train = sorted(set(tree["train"]) - set(tree[split]))
            only_other = sorted(set(tree[split]) - set(tree["train"]))
            if only_train:
                raise DataError(f"class(es) {', '.join(only_train)} in {splits['train']} have no images in "
                                f"{splits[split]}")
            if only_other:
                raise DataError(f"class(es) {', '.join(only_other)} in {splits[split]} have no images in "
                                f"{splits['train']}")
        return tree, [line for line in (wrappers, note, _ignored_note(ignored)) if line]
    classes, ignored = _class_folders(root)
    # Split a single tree per class by ratio, with a fixed seed so the test images never depend on --seed.
    tree: Tree = {"train": {}, "test": {}}
    for name, entries in classes.items():
        if len(entries) < 3:
            raise DataError(f"class {name!r} in {root} has {len(entries)} image(s); at least 3 are needed to split")
        order = np.random.default_rng(TEST_SPLIT_SEED).permutation(len(entries))
        n_test = max(1, round(len(entries) * test_fraction))
        tree["test"][name] = [entries[i] for i in sorted(order[:n_test])]
        tree["train"][name] = [entries[i] for i in sorted(order[n_test:])]
    return tree, [line for line in (wrappers, _ignored_note(ignored)) if line]


def _inside_wrapper_folders(root: Path) -> tuple[Path, str]:
    """(the folder holding the data, the line saying so or ""): an unpacked archive often wraps the class folders
    (or train/ and test/) in one folder of the data set's name, and a single class folder is never data to
    classify, so a folder holding nothing but one folder stands for that folder's contents (a lone train/ stays
    refused for its missing test/)."""
    start = root
    while True:
        entries = [path for path in root.iterdir() if not path.name.startswith(".")]
        folders = [path for path in entries if path.is_dir()]
        if (len(folders) != 1 or folders[0].name in ("train", "test", *VALIDATION_FOLDERS)
                or any(path.suffix.lower() in IMAGE_SUFFIXES for path in entries)
                or not any(path.is_dir() for path in folders[0].iterdir())):
            break
        root = folders[0]
    if root == start:
        return root, ""
    return root, f"data: {start} holds only {root.relative_to(start)}/; its folders are taken as the data's"


def _ignored_note(ignored: Counter) -> str:
    """The line saying which files in the class folders are not images of a kind read here, or ""."""
    if not ignored:
        return ""
    return (f"ignored {sum(ignored.values()):,} file(s) that are not {'/'.join(IMAGE_SUFFIXES)} images "
            f"({_file_kinds(ignored)})")


def _file_kinds(counts: Counter) -> str:
    """".heic 120, .txt 2": the commonest suffixes and how many files have each."""
    return ", ".join(f"{suffix} {count:,}" for suffix, count in counts.most_common(3)) + (
        ", ..." if len(counts) > 3 else "")


def _class_folders(root: Path) -> tuple[dict[str, list[Entry]], Counter]:
    """({class name: its images} of the class folders in `root`, their subfolders' images included; how many
    other files each suffix names). Hidden files and folders are skipped (macOS copies carry a "._name.jpg" beside
    each image); names are compared in Unicode NFC form, since macOS writes "café" in the decomposed form another
    system does not."""
    classes, empty, ignored = {}, [], Counter()
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entries = []
        for path in sorted(class_dir.rglob("*")):
            hidden = any(part.startswith(".") for part in path.relative_to(class_dir).parts)
            if hidden or not path.is_file():
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES:
                stat = path.stat()
                entries.append((str(path), stat.st_size, stat.st_mtime, path.read_bytes))
            else:
                ignored[path.suffix.lower() or "(no suffix)"] += 1
        name = unicodedata.normalize("NFC", class_dir.name)
        if name in classes:
            raise DataError(f"{root} holds two folders named {name!r} (in different Unicode forms); merge them")
        if entries:
            classes[name] = entries
        else:
            empty.append(name)
    if not classes:
        found = f" (only other files: {_file_kinds(ignored)})" if ignored else ""
        raise DataError(f"no images found in {root}{found}: expected class folders holding "
                        f"{'/'.join(IMAGE_SUFFIXES)} files")
    if empty:  # a class the data would silently lack: the model's outputs would no longer line up with the folders
        raise DataError(f"class folder(s) {', '.join(empty)} in {root} hold no {'/'.join(IMAGE_SUFFIXES)} images; "
                        "add images or remove the folder")
    return classes, ignored


def _zip_tree(archive_path) -> Tree:
    tree: Tree = {"train": {}, "test": {}}
    with zipfile.ZipFile(io.BytesIO(archive_path.read_bytes())) as archive:
        for info in archive.infolist():
            split, class_name, _ = info.filename.split("/", 2)
            data = archive.read(info)
            entry = (info.filename, info.file_size, info.CRC, lambda data=data: data)
            tree[split].setdefault(class_name, []).append(entry)
    return tree


class _Decoded(NamedTuple):
    """A source's images: its training and test splits, class names, its own validation split (or None) and the
    images left out because they cannot be read ("path: why")."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    val: tuple[np.ndarray, np.ndarray] | None
    unreadable: tuple[str, ...] = ()


def _decode_cached(tree: Tree, image_size, cache_dir: Path, skip_unreadable: bool = False,
                   log: Callable[[str], None] | None = None) -> _Decoded:
    """A tree's images, from the cache when its listing was decoded before; unreadable images refuse the tree
    unless `skip_unreadable` (the cache remembers which were left out)."""
    class_names = tuple(sorted(tree["train"]))
    splits = [split for split in ("train", "test", "val") if split in tree]
    listing = hashlib.sha256(f"{DECODER_VERSION}|{image_size!r}".encode())
    for split in splits:
        for class_name in class_names:
            for name, size, mtime, _ in tree[split][class_name]:
                listing.update(f"{split}|{name}|{size}|{mtime}\n".encode())
    cache_file = cache_dir / f"images-{listing.hexdigest()[:24]}.npz"
    arrays = None
    if cache_file.exists():
        try:
            with np.load(cache_file) as cached:
                arrays = {split: (cached[f"x_{split}"], cached[f"y_{split}"]) for split in splits}
                unreadable = tuple(str(item) for item in cached["unreadable"]) if "unreadable" in cached else ()
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            arrays = None  # a damaged cache file is rebuilt below
    if arrays is None:
        progress = _DecodeProgress(sum(len(entries) for split in splits for entries in tree[split].values()), log)
        decoded = {split: _decode_split(tree[split], class_names, image_size, progress) for split in splits}
        unreadable = tuple(problem for split in splits for problem in decoded[split][2])
        if unreadable and not skip_unreadable:
            raise _unreadable_error(unreadable, progress.total)
        arrays = {split: _stacked(split, images, labels, class_names)
                  for split, (images, labels, _) in decoded.items()}
        progress.done(cache_file)
        if len({x.shape[-1] for x, _ in arrays.values()}) > 1:  # a grayscale split beside a colour one: all RGB
            arrays = {split: (np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x, y)
                      for split, (x, y) in arrays.items()}
        train = arrays["train"][0]
        for split, (x, _) in list(arrays.items())[1:]:
            if x.shape[1:3] != train.shape[1:3]:
                raise DataError(f"training images are {train.shape[1]}x{train.shape[2]} but {split} images "
                                f"{x.shape[1]}x{x.shape[2]}; pass --image-size HxW to resize them all")
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            partial = cache_file.with_suffix(f".{os.getpid()}.partial")
            with open(partial, "wb") as handle:
                np.savez(handle, unreadable=np.array(unreadable, dtype=str),
                         **{f"{kind}_{split}": array for split, pair in arrays.items()
                            for kind, array in zip("xy", pair)})
            os.replace(partial, cache_file)
        except OSError:
            pass  # a read-only or full cache folder costs speed, not correctness
    elif unreadable and not skip_unreadable:  # cached by a run that left them out; this one was not asked to
        raise _unreadable_error(unreadable, sum(len(y) for _, y in arrays.values()) + len(unreadable))
    return _Decoded(*arrays["train"], *arrays["test"], class_names, arrays.get("val"), unreadable)


def _unreadable_error(unreadable: tuple[str, ...], total: int) -> DataError:
    return DataError(f"{len(unreadable):,} of {total:,} images cannot be read ({listed(list(unreadable), 2, '; ')}); "
                     "remove them, or pass --skip-unreadable to leave them out")


class _DecodeProgress:
    """Says that `total` images are being decoded and, for a large set, each further tenth of them."""

    def __init__(self, total: int, log: Callable[[str], None] | None):
        self.total, self.log, self.count, self.started = total, log, 0, time.perf_counter()
        self.lock = threading.Lock()  # images are decoded on several threads
        self.step = max(total // 10, PROGRESS_MIN_IMAGES)
        if log is not None and total >= PROGRESS_MIN_IMAGES:
            log(f"decoding {total:,} images (once: they are cached for later runs) ...")

    def advance(self) -> None:
        with self.lock:
            self.count += 1
            count = self.count
        if self.log is not None and count % self.step == 0 and count < self.total:
            self.log(f"    {count:,} of {self.total:,} images decoded ({time.perf_counter() - self.started:.0f} s)")

    def done(self, cache_file: Path) -> None:
        if self.log is not None and self.total >= PROGRESS_MIN_IMAGES:
            self.log(f"    {self.total:,} images decoded in {time.perf_counter() - self.started:.0f} s, cached in "
                     f"{cache_file}")


def _decode_split(classes: dict[str, list[Entry]], class_names, image_size, progress: _DecodeProgress):
    """([images], [labels], ["path: why" of each image that cannot be read]) of one split."""
    entries = [(entry, label) for label, name in enumerate(class_names) for entry in classes[name]]

    def decode(item):
        try:
            return _decode_image(item[0], image_size)
        except _Unreadable as problem:
            return f"{_short_path(item[0][0])}: {problem}"
        finally:
            progress.advance()

    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = list(pool.map(decode, entries))
    kept = [(image, label) for image, (_, label) in zip(decoded, entries) if not isinstance(image, str)]
    return [image for image, _ in kept], [label for _, label in kept], [item for item in decoded
                                                                        if isinstance(item, str)]


def _stacked(split: str, images: list, labels: list, class_names) -> tuple[np.ndarray, np.ndarray]:
    """One split's images as one uint8 array (grey ones made RGB beside colour ones) and its labels."""
    missing = [name for label, name in enumerate(class_names) if label not in set(labels)]
    if missing:  # every image of a class was left out unreadable: the model's outputs would not match the classes
        raise DataError(f"class(es) {listed(missing)} have no readable {split} image")
    shapes = Counter(image.shape[:2] for image in images)
    if len(shapes) > 1:
        (a, _), (b, _) = shapes.most_common(2)
        raise DataError(
            f"images differ in size ({a[0]}x{a[1]}, {b[0]}x{b[1]}, ...); pass --image-size HxW to resize them"
        )
    if any(image.shape[2] == 3 for image in images):
        images = [np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image for image in images]
    return np.stack(images), np.array(labels, dtype=np.int64)


class _Unreadable(Exception):
    """An image file that cannot be decoded; its text says why."""


def _short_path(name: str) -> str:
    """The last three parts of an image's path (split/class/file in a folder set): enough to find it."""
    return "/".join(Path(name).parts[-3:])


def _decode_image(entry: Entry, image_size) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    _, _, _, read = entry
    content = read()
    if not content:
        raise _Unreadable("the file is empty")
    try:
        with Image.open(io.BytesIO(content)) as image:
            if image.mode.startswith(("I;16", "I")):  # 16-bit grey (PNG, TIFF): PIL's convert("L") would clip it
                image = Image.fromarray(np.round(np.asarray(image, dtype=np.float64) / 257).clip(0, 255)
                                        .astype(np.uint8), "L")
            image = image.convert("L" if image.mode in ("1", "L", "F") else "RGB")
            if image_size is not None and image.size != (image_size[1], image_size[0]):
                image = image.resize((image_size[1], image_size[0]), Image.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except UnidentifiedImageError:
        raise _Unreadable("not an image PIL can read, or a damaged one") from None
    except (OSError, ValueError) as exc:
        raise _Unreadable(first_line(exc, 80)) from exc
    return array[..., None] if array.ndim == 2 else array


def _download_cifar10(image_size):
    from compress.keras import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as exc:  # urllib raises several types; each means the same thing to the user
        raise DataError(
            f"could not download CIFAR-10 ({type(exc).__name__}); offline, point to a class-folder copy "
            f"with --data-dir DIR or ${CIFAR10_DIR_ENV} (DIR/train/<class>/, DIR/test/<class>/)"
        ) from exc
    if image_size is not None and tuple(image_size) != x_train.shape[1:3]:
        raise DataError("--image-size is not supported for the downloaded CIFAR-10; use a class-folder copy")
    return _Decoded(x_train, y_train.ravel().astype(np.int64), x_test, y_test.ravel().astype(np.int64),
                    CIFAR10_CLASSES, None)
