"""Build compress/datasets/cifar10_mini.zip, the class-balanced CIFAR-10 subset shipped with the package.

Files taken, exactly: from a class-folder copy of CIFAR-10 (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg),
for each of the 10 classes the first 500 training files and the first 100 test files in sorted name
order (train/<class>/0000.jpg .. 0499.jpg, test/<class>/0000.jpg .. 0099.jpg): 5,000 train and
1,000 test images. The JPEG bytes are copied unchanged; the zip is stored without recompression and
with fixed timestamps, so rebuilding it from the same source gives the same file.

Usage: python scripts/make_cifar10_mini.py SOURCE_DIR [--out compress/datasets/cifar10_mini.zip]
"""

import argparse
import sys
import zipfile
from pathlib import Path

TRAIN_PER_CLASS = 500
TEST_PER_CLASS = 100
FIXED_TIMESTAMP = (2026, 1, 1, 0, 0, 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="class-folder CIFAR-10 copy with train/ and test/")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "compress/datasets/cifar10_mini.zip")
    args = parser.parse_args()
    taken = 0
    with zipfile.ZipFile(args.out, "w", compression=zipfile.ZIP_STORED) as archive:
        for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
            class_dirs = sorted(p for p in (args.source / split).iterdir() if p.is_dir())
            if len(class_dirs) != 10:
                print(f"error: expected 10 class folders in {args.source / split}", file=sys.stderr)
                return 2
            for class_dir in class_dirs:
                files = sorted(class_dir.glob("*.jpg"))[:per_class]
                if len(files) < per_class:
                    print(f"error: {class_dir} holds fewer than {per_class} images", file=sys.stderr)
                    return 2
                for path in files:
                    info = zipfile.ZipInfo(f"{split}/{class_dir.name}/{path.name}", FIXED_TIMESTAMP)
                    archive.writestr(info, path.read_bytes())
                    taken += 1
    print(f"wrote {args.out} ({taken} images, {args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
