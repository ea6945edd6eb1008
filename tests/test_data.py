"""Data sources: shapes, dtypes, balance, stratified validation, caching, and refusals of bad folders."""

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import make_folder_set
from compress.data import CIFAR10_CLASSES, load_data, stratified_split
from compress.errors import DataError


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return load_data("cifar10-mini", cache_dir=tmp_path_factory.mktemp("cache"))


def test_mini_shapes_dtypes_and_balance(mini):
    assert mini.class_names == CIFAR10_CLASSES
    assert mini.input_shape == (32, 32, 3)
    assert mini.x_train.dtype == np.uint8 and mini.y_train.dtype == np.int64
    assert len(mini.y_train) + len(mini.y_val) == 5000 and len(mini.y_test) == 1000
    for labels, expected in ((mini.y_train, 450), (mini.y_val, 50), (mini.y_test, 100)):
        assert np.bincount(labels, minlength=10).tolist() == [expected] * 10


def test_mini_pipeline_is_normalised_and_batched(mini):
    images, labels = next(iter(mini.pipeline("train", 32, shuffle=True, augment=True)))
    assert images.shape == (32, 32, 32, 3) and images.dtype.name == "float32"
    assert 0.0 <= float(images.numpy().min()) and float(images.numpy().max()) <= 1.0
    assert labels.shape == (32,)


def test_pipeline_does_not_autotune(mini):
    # tf.data's autotuning made `fit` on the full set return ~50 s after its last epoch (see Dataset.pipeline).
    pipeline = mini.pipeline("train", 32, shuffle=True, augment=True)
    assert pipeline.options().autotune.enabled is False
    assert len(list(pipeline)) == -(-len(mini.y_train) // 32)


def test_validation_split_is_stratified_even_for_class_sorted_data():
    # Data read from class folders arrives sorted by class; Keras' validation_split=0.2 would take the last
    # 20%, i.e. only the last two classes. Ours must hold every class, in proportion.
    labels = np.repeat(np.arange(10), 100)
    keras_style_val = labels[int(len(labels) * 0.8):]
    assert len(np.unique(keras_style_val)) == 2
    train_idx, val_idx = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[val_idx], minlength=10).tolist() == [20] * 10
    assert set(train_idx).isdisjoint(val_idx) and len(train_idx) + len(val_idx) == len(labels)


def test_validation_comes_from_training_images_never_test(mini):
    test_bytes = {image.tobytes() for image in mini.x_test}
    assert not any(image.tobytes() in test_bytes for image in mini.x_val)
    assert len(np.unique(mini.y_val)) == 10


def test_seed_changes_validation_split_reproducibly(tmp_path):
    a = load_data("cifar10-mini", seed=1, cache_dir=tmp_path)
    b = load_data("cifar10-mini", seed=1, cache_dir=tmp_path)
    c = load_data("cifar10-mini", seed=2, cache_dir=tmp_path)
    assert np.array_equal(a.x_val, b.x_val) and not np.array_equal(a.x_val, c.x_val)
    assert np.array_equal(a.x_test, c.x_test)


def test_second_load_reuses_the_cache(tmp_path):
    cache = tmp_path / "cache"
    load_data("cifar10-mini", cache_dir=cache)
    files = list(cache.glob("images-*.npz"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    started = time.perf_counter()
    load_data("cifar10-mini", cache_dir=cache)
    assert time.perf_counter() - started < 3.0
    assert files[0].stat().st_mtime_ns == stamp  # read, not rewritten


def test_damaged_cache_is_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    first = load_data("cifar10-mini", cache_dir=cache)
    cache_file = next(cache.glob("images-*.npz"))
    cache_file.write_bytes(b"not an npz")
    again = load_data("cifar10-mini", cache_dir=cache)
    assert np.array_equal(first.x_test, again.x_test)


def test_folder_with_train_and_test(tmp_path):
    data = load_data(f"folder:{make_folder_set(tmp_path / 'set')}", cache_dir=tmp_path / "c", val_fraction=0.34)
    assert data.class_names == ("cat", "dog", "fox")
    assert data.input_shape == (12, 10, 3)
    assert np.bincount(data.y_val).tolist() == [2, 2, 2]
    assert np.bincount(data.y_test).tolist() == [3, 3, 3]


def test_flat_folder_is_split_by_ratio_with_a_fixed_test_set(tmp_path):
    root = make_folder_set(tmp_path / "flat", per_class=10, layout="flat")
    a = load_data(f"folder:{root}", cache_dir=tmp_path / "c", seed=0)
    b = load_data(f"folder:{root}", cache_dir=tmp_path / "c", seed=5)
    assert np.bincount(a.y_test).tolist() == [2, 2, 2]
    assert np.array_equal(a.x_test, b.x_test)


def test_grayscale_and_resize(tmp_path):
    root = make_folder_set(tmp_path / "gray", mode="L", size=(20, 20))
    data = load_data(f"folder:{root}", cache_dir=tmp_path / "c", image_size=(8, 8))
    assert data.input_shape == (8, 8, 1)


def test_mixed_sizes_need_image_size(tmp_path):
    root = make_folder_set(tmp_path / "mixed")
    Image.new("RGB", (40, 40)).save(root / "train" / "cat" / "big.png")
    with pytest.raises(DataError, match="--image-size"):
        load_data(f"folder:{root}", cache_dir=tmp_path / "c")
    assert load_data(f"folder:{root}", cache_dir=tmp_path / "c", image_size=(16, 16)).input_shape == (16, 16, 3)


def test_a_val_folder_beside_train_and_test_is_the_validation_split(tmp_path):
    """The user's own validation images are used as such (they were ignored), and said; --val-fraction is not."""
    root = make_folder_set(tmp_path / "set")
    (root / "train").rename(root / "all")
    make_folder_set(tmp_path / "v", per_class=4)
    (tmp_path / "v" / "train").rename(root / "val")
    (root / "all").rename(root / "train")
    data = load_data(f"folder:{root}", cache_dir=tmp_path / "c", val_fraction=0.5)
    assert np.bincount(data.y_val).tolist() == [4, 4, 4] and np.bincount(data.y_train).tolist() == [6, 6, 6]
    assert "val/" in data.notes[0] and "validation" in data.describe()["notes"][0]
    again = load_data(f"folder:{root}", cache_dir=tmp_path / "c", val_fraction=0.5)  # from the cache
    assert np.array_equal(again.x_val, data.x_val) and np.array_equal(again.x_test, data.x_test)


def test_train_and_val_folders_alone_take_val_as_the_test_split(tmp_path):
    root = make_folder_set(tmp_path / "set")
    (root / "test").rename(root / "validation")
    data = load_data(f"folder:{root}", cache_dir=tmp_path / "c", val_fraction=0.34)
    assert np.bincount(data.y_test).tolist() == [3, 3, 3] and np.bincount(data.y_val).tolist() == [2, 2, 2]
    assert data.notes[0].startswith("test split: the images of validation/")


@pytest.mark.parametrize("layout", ["split", "flat"])
def test_an_unpacked_archive_s_wrapping_folder_is_looked_inside_and_an_archive_is_named(layout, tmp_path):
    """A folder holding one folder (flowers/flower_photos/daisy/...) was one class, refused; an archive given as
    the folder was "not a folder"."""
    import shutil

    make_folder_set(tmp_path / "flowers" / "flower_photos" / "inner", layout=layout)
    (tmp_path / "flowers" / ".DS_Store").write_bytes(b"")
    data = load_data(f"folder:{tmp_path / 'flowers'}", cache_dir=tmp_path / "c")
    assert data.class_names == ("cat", "dog", "fox") and len(data.y_test) > 0
    assert f"holds only {Path('flower_photos', 'inner')}/" in data.notes[0]
    archive = shutil.make_archive(str(tmp_path / "flowers"), "zip", tmp_path / "flowers")
    with pytest.raises(DataError, match="is an archive: unpack it and pass the folder it holds"):
        load_data(f"folder:{archive}", cache_dir=tmp_path / "c")
    (tmp_path / "lone" / "train").mkdir(parents=True)
    make_folder_set(tmp_path / "lone" / "train", layout="flat")
    with pytest.raises(DataError, match="has a train/ folder but no test/"):
        load_data(f"folder:{tmp_path / 'lone'}", cache_dir=tmp_path / "c")
    one_class = make_folder_set(tmp_path / "one", classes=("cat",), layout="flat")
    with pytest.raises(DataError, match="has 1 class"):  # a folder of images is a class, not a wrapper
        load_data(f"folder:{one_class}", cache_dir=tmp_path / "c")


def test_webp_tiff_and_gif_images_are_read(tmp_path):
    root = make_folder_set(tmp_path / "set")
    for number, suffix in enumerate((".webp", ".tif", ".gif")):
        Image.new("RGB", (10, 12), (number * 50, 0, 0)).save(root / "train" / "cat" / f"extra{suffix}")
    data = load_data(f"folder:{root}", cache_dir=tmp_path / "c", val_fraction=0.2)
    assert len(data.y_train) + len(data.y_val) == 6 * 3 + 3


def test_decoding_a_large_folder_shows_progress_once(tmp_path, monkeypatch):
    """Decoding tens of thousands of images takes minutes: said, with progress; a cached load says nothing."""
    import compress.data

    monkeypatch.setattr(compress.data, "PROGRESS_MIN_IMAGES", 5)  # this folder stands in for a large one
    root = make_folder_set(tmp_path / "set")
    said = []
    load_data(f"folder:{root}", cache_dir=tmp_path / "c", log=said.append)
    assert said[0] == "decoding 27 images (once: they are cached for later runs) ..."
    assert any(line.startswith("    5 of 27 images decoded") for line in said)
    assert said[-1].startswith("    27 images decoded in ") and str(tmp_path / "c") in said[-1]
    said.clear()
    load_data(f"folder:{root}", cache_dir=tmp_path / "c", log=said.append)
    assert said == []


def test_cifar10_from_class_folder_copy_via_environment(tmp_path, monkeypatch):
    root = make_folder_set(tmp_path / "c10", classes=CIFAR10_CLASSES, per_class=4, size=(32, 32))
    monkeypatch.setenv("COMPRESS_CIFAR10_DIR", str(root))
    data = load_data("cifar10", cache_dir=tmp_path / "c")
    assert data.class_names == CIFAR10_CLASSES and data.input_shape == (32, 32, 3)


def test_cifar10_offline_without_a_copy_says_how_to_provide_it(monkeypatch, tmp_path):
    from compress.keras import keras

    def offline():
        raise OSError("URL fetch failure: no network")

    monkeypatch.delenv("COMPRESS_CIFAR10_DIR", raising=False)
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(DataError, match="COMPRESS_CIFAR10_DIR"):
        load_data("cifar10", cache_dir=tmp_path)


@pytest.mark.parametrize(
    "prepare, message",
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: (root / "empty").mkdir() or root / "empty", "no images"),
        (lambda root: _drop_test_class(make_folder_set(root / "s"), "fox"), "fox"),
        (lambda root: _corrupt_image(make_folder_set(root / "s")), "broken.png"),
        (lambda root: _empty_class(make_folder_set(root / "s"), "owl"), "owl in .* hold no"),
        (lambda root: (make_folder_set(root / "s") / "train").rename(root / "s" / "val") and root / "s",
         "folder but no train/ folder"),
    ],
    ids=["missing-folder", "no-images", "class-missing-in-test", "unreadable-image", "empty-class-folder",
         "no-train-folder"],
)
def test_bad_folders_are_refused_in_one_line(tmp_path, prepare, message):
    path = prepare(tmp_path)
    with pytest.raises(DataError, match=message) as caught:
        load_data(f"folder:{path}", cache_dir=tmp_path / "c")
    assert "\n" not in str(caught.value)


def test_folder_source_needs_a_path():
    with pytest.raises(DataError, match="needs the path"):
        load_data("folder:")


def test_hidden_files_are_skipped_and_class_names_match_in_any_unicode_form(tmp_path):
    import unicodedata

    root = make_folder_set(tmp_path / "s", classes=("café", "thé"))
    (root / "train" / "café" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS's resource fork
    (root / "test" / "café").rename(root / "test" / unicodedata.normalize("NFD", "café"))  # a Mac's copy
    data = load_data(f"folder:{root}", cache_dir=tmp_path / "c")
    assert data.class_names == ("café", "thé") and np.bincount(data.y_test).tolist() == [3, 3]


def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 8, 8), dtype=np.uint16)
    for kind, scale in (("eight", 1), ("sixteen", 257)):
        for split in ("train", "test"):
            for name in ("a", "b"):
                folder = tmp_path / kind / split / name
                folder.mkdir(parents=True)
                for i, image in enumerate(pixels):
                    array = image * scale
                    Image.fromarray(array.astype(np.uint8) if scale == 1 else array).save(folder / f"{i}.png")
    eight, sixteen = (load_data(f"folder:{tmp_path / kind}", cache_dir=tmp_path / "c") for kind in ("eight", "sixteen"))
    assert np.array_equal(eight.x_test, sixteen.x_test) and sixteen.input_shape == (8, 8, 1)


def test_fingerprint_follows_the_images_not_the_folder_name(tmp_path):
    root = make_folder_set(tmp_path / "s")
    before = load_data(f"folder:{root}", cache_dir=tmp_path / "c").fingerprint()
    assert load_data(f"folder:{root}", cache_dir=tmp_path / "c").fingerprint() == before
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(root / "test" / "dog" / "000.png")  # one image changed
    assert load_data(f"folder:{root}", cache_dir=tmp_path / "c").fingerprint() != before


def test_unknown_source_lists_known_ones():
    with pytest.raises(DataError, match="cifar10-mini, cifar10, folder:PATH"):
        load_data("imagenet")


def _drop_test_class(root, name):
    for path in (root / "test" / name).iterdir():
        path.unlink()
    (root / "test" / name).rmdir()
    return root


def _empty_class(root, name):
    for split in ("train", "test"):
        (root / split / name).mkdir()
    return root


def _corrupt_image(root):
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG truncated")
    return root


def test_cache_folder_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "envcache"))
    load_data("cifar10-mini")
    assert list((tmp_path / "envcache").glob("images-*.npz"))


def test_a_run_is_keyed_by_the_cifar10_folder_however_it_was_named(tmp_path, monkeypatch):
    """--data-dir and $COMPRESS_CIFAR10_DIR naming the same folder give the same data arguments, so that a run folder
    made with one resumes with the other."""
    from compress.cli import data_arguments
    from compress.cli_parser import build_parser

    parser = build_parser()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "copy").mkdir()
    given = data_arguments(parser.parse_args(["run", "--data", "cifar10", "--data-dir", "copy"]))
    monkeypatch.setenv("COMPRESS_CIFAR10_DIR", str(tmp_path / "copy"))
    from_environment = data_arguments(parser.parse_args(["run", "--data", "cifar10"]))
    assert given == from_environment and given["data_dir"] == str((tmp_path / "copy").resolve())
    assert data_arguments(parser.parse_args(["run"]))["data_dir"] is None  # the shipped subset needs no folder
    assert "skip_unreadable" not in given  # absent unless asked: run folders keyed before the option still resume
    assert data_arguments(parser.parse_args(["run", "--skip-unreadable"]))["skip_unreadable"] is True


def test_unreadable_images_are_all_named_at_once_or_left_out_when_asked(tmp_path):
    """A folder with a few damaged files (the Keras guide's cats-vs-dogs set has 1,578) refused at the first one,
    so a user fixed it one file per run; now all are counted in one line, and --skip-unreadable leaves them out."""
    root = make_folder_set(tmp_path / "s")
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG truncated")
    (root / "train" / "fox" / "notes.jpg").write_text("not an image")
    (root / "test" / "cat" / "empty.jpg").write_bytes(b"")
    for attempt in ("decoded", "cached"):  # the second refusal reads the cache the skipping load wrote
        with pytest.raises(DataError) as caught:
            load_data(f"folder:{root}", cache_dir=tmp_path / "c")
        message = str(caught.value)
        assert message.startswith("3 of 30 images cannot be read (") and "--skip-unreadable" in message, attempt
        assert "train/dog/broken.png" in message and "\n" not in message and len(message) < 300
        data = load_data(f"folder:{root}", cache_dir=tmp_path / "c", skip_unreadable=True)
        assert np.bincount(data.y_test).tolist() == [3, 3, 3] and len(data.y_train) + len(data.y_val) == 18
        assert data.notes[0].startswith("left out 3 unreadable image(s): ")
        assert "test/cat/empty.jpg: the file is empty" in data.notes[0]
        assert data.describe()["notes"] == list(data.notes)
    for image in (root / "test" / "cat").glob("*.png"):
        image.write_bytes(b"")
    with pytest.raises(DataError, match="class.es. cat have no readable test image"):
        load_data(f"folder:{root}", cache_dir=tmp_path / "c", skip_unreadable=True)


def test_images_in_a_class_folders_subfolders_are_read(tmp_path):
    """As Keras' image_dataset_from_directory reads them; they were silently left out (a class folder holding only
    subfolders was refused as empty)."""
    root = make_folder_set(tmp_path / "s", layout="flat")
    flat = load_data(f"folder:{root}", cache_dir=tmp_path / "c")
    for index, image in enumerate(sorted((root / "cat").glob("*.png"))):
        (root / "cat" / f"batch{index % 2}").mkdir(exist_ok=True)
        image.rename(root / "cat" / f"batch{index % 2}" / image.name)
    (root / "dog" / ".thumbnails").mkdir()
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(root / "dog" / ".thumbnails" / "000.png")
    nested = load_data(f"folder:{root}", cache_dir=tmp_path / "c")
    assert np.bincount(nested.y_train).tolist() == np.bincount(flat.y_train).tolist()
    assert np.bincount(nested.y_test).tolist() == np.bincount(flat.y_test).tolist() == [1, 1, 1]


def test_arrays_in_any_common_pixel_range_and_label_form_give_the_same_dataset():
    """Images in memory, as keras.datasets gives them or as a training script normalised them: uint8, floats in
    [0, 1], [-1, 1] or 0-255, grey without a channel axis; labels as indices, (N, 1) or one-hot rows. Read as
    0-255 pixels, the range said, so that no model is fed images a factor of 255 off."""
    from compress import dataset_from_arrays

    rng = np.random.default_rng(0)
    grey, labels = rng.integers(0, 256, (40, 6, 5), dtype=np.uint8), np.arange(40) % 4
    test, test_labels = rng.integers(0, 256, (12, 6, 5), dtype=np.uint8), np.arange(12) % 4
    expected = dataset_from_arrays(grey, labels, test, test_labels, class_names="abcd")
    assert expected.notes == () and expected.input_shape == (6, 5, 1) and expected.class_names == tuple("abcd")
    assert np.bincount(expected.y_val).tolist() == [1, 1, 1, 1]
    for pixels, said in ((lambda x: x / 255, "read as the range [0, 1] and scaled to 0-255"),
                         (lambda x: x / 127.5 - 1, "read as the range [-1, 1] and scaled"),
                         (lambda x: x.astype(np.float32)[..., None], "read as the range 0-255")):
        data = dataset_from_arrays(pixels(grey), labels[:, None], pixels(test), np.eye(4)[test_labels],
                                   class_names="abcd")
        assert np.array_equal(data.x_train, expected.x_train) and np.array_equal(data.x_test, expected.x_test)
        assert np.array_equal(data.y_test, expected.y_test) and said in data.notes[0]
        assert data.notes[1] == "labels: y_test one-hot, read as class indices"


@pytest.mark.parametrize("change, message", [
    ({"x_train": lambda x: x * 300.0, "x_test": lambda x: x * 1.0}, "values from 0 to 76500"),
    ({"x_train": lambda x: x[..., None].repeat(2, axis=-1)}, "1 or 3 channels"),
    ({"y_train": lambda y: y[:-1]}, "one label per image"),
    ({"y_test": lambda y: y * 0}, "class.es. 1, 2, 3 have no test images"),
    ({"y_train": lambda y: y + 0.5}, "class indices"),
    ({"x_test": lambda x: x / 255.0}, "differ in type: x_train uint8, x_test float64"),
], ids=["out-of-range", "two-channels", "label-count", "class-missing", "fractional-labels", "uint8-beside-floats"])
def test_arrays_that_are_not_images_and_labels_are_refused_in_one_line(change, message):
    from compress import dataset_from_arrays

    arrays = {"x_train": np.arange(40 * 9, dtype=np.uint8).reshape(40, 3, 3), "y_train": np.arange(40) % 4,
              "x_test": np.zeros((8, 3, 3), np.uint8), "y_test": np.arange(8) % 4}
    for key, how in change.items():
        arrays[key] = how(arrays[key])
    with pytest.raises(DataError, match=message) as caught:
        dataset_from_arrays(**arrays)
    assert "\n" not in str(caught.value)


def test_a_dataset_of_float_images_built_directly_is_refused():
    from compress.data import Dataset

    images, labels = np.zeros((4, 3, 3, 1), np.float32), np.zeros(4, np.int64)
    with pytest.raises(DataError, match="x_train must be uint8 images .* dataset_from_arrays"):
        Dataset("mine", ("a", "b"), images, labels, images, labels, images, labels)


def test_an_npz_file_of_arrays_is_a_data_source(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=rng.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8), y_train=np.arange(30) % 3,
             x_test=rng.integers(0, 256, (9, 4, 4, 3), dtype=np.uint8), y_test=np.arange(9) % 3,
             class_names=np.array(["zero", "one", "two"]))
    data = load_data(f"npz:{path}")
    assert data.class_names == ("zero", "one", "two") and data.input_shape == (4, 4, 3) and len(data.y_test) == 9
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((3, 4, 4), np.uint8))
    for source, message in ((f"npz:{tmp_path / 'partial.npz'}", "lacks y_train, x_test, y_test"),
                            (f"npz:{tmp_path / 'missing.npz'}", "does not exist")):
        with pytest.raises(DataError, match=message):
            load_data(source)


def test_files_that_are_not_images_of_a_kind_read_are_counted_not_dropped_silently(tmp_path):
    """An iPhone's HEIC photos beside JPEGs were left out without a word; a folder of them only said "no images"."""
    root = make_folder_set(tmp_path / "s")
    for index in range(3):
        (root / "train" / "cat" / f"IMG_{index}.HEIC").write_bytes(b"ftypheic")
    (root / "test" / "dog" / "labels.txt").write_text("dog")
    data = load_data(f"folder:{root}", cache_dir=tmp_path / "c")
    assert data.notes == ("ignored 4 file(s) that are not .png/.jpg/.jpeg/.bmp/.webp/.gif/.tif/.tiff images "
                          "(.heic 3, .txt 1)",)
    photos = tmp_path / "photos" / "cat"
    photos.mkdir(parents=True)
    (photos / "IMG_1.heic").write_bytes(b"ftypheic")
    with pytest.raises(DataError, match=r"no images found in .*photos \(only other files: \.heic 1\)"):
        load_data(f"folder:{tmp_path / 'photos'}", cache_dir=tmp_path / "c")
