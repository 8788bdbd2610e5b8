"""python bench/shapes_write.py --n 10000 [--image-size 64] [--workers N] [--out DIR]

Times writing N scenes of the shapes world with every task's records (PNG images, COCO captions,
VQAv2, refs + instances, SNLI-VE) and prints scenes/s and the total seconds. Writes into a temporary
folder that is removed afterwards unless --out is given. The goal on the 2-core development machine:
10,000 scenes at S = 64 in under a minute.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from unifier.data.shapes_writer import default_workers, write_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", default=None, help="keep the data here (default: a temporary folder)")
    args = parser.parse_args()

    workers = args.workers or default_workers()
    with tempfile.TemporaryDirectory(prefix="shapes-bench-") as scratch:
        start = time.perf_counter()
        counts = write_shapes(args.out or scratch, args.split, args.n, image_size=args.image_size, workers=workers)
        seconds = time.perf_counter() - start
    print(f"shapes write: {args.n} scenes at S={args.image_size} with {workers} workers")
    print(f"records: {counts}")
    print(f"total {seconds:.2f} s, {args.n / seconds:.0f} scenes/s")


if __name__ == "__main__":
    main()
