"""`unifier data`: build data sets on disk.

    unifier data shapes --out data/shapes --split val --n 1000 [--seed 0] [--image-size 64] [--workers N]

writes scenes 0 .. n - 1 of one split of the shapes world to OUT/{split} in the public layouts
(COCO captions, VQAv2, refs + COCO instances, SNLI-VE, PNG images; see unifier/data/shapes_writer.py).
"""

from __future__ import annotations

import argparse
import time

from unifier.data.shapes import SPLITS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unifier data", description="Build data sets on disk.")
    commands = parser.add_subparsers(dest="command", required=True)
    shapes = commands.add_parser(
        "shapes",
        help="write the shapes world in the public layouts",
        description="Write scenes 0 .. n - 1 of one split of the shapes world to OUT/SPLIT in the public layouts.",
    )
    shapes.add_argument("--out", required=True, help="output folder; the split is written to OUT/SPLIT")
    shapes.add_argument("--split", choices=SPLITS, default="train")
    shapes.add_argument("--n", type=int, required=True, help="number of scenes")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--image-size", type=int, default=64, help="canvas side S, a multiple of 16 (default 64)")
    shapes.add_argument("--workers", type=int, default=None, help="processes (default: the CPUs available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here so `unifier data --help` stays instant.
    from unifier.data.shapes_writer import write_shapes

    start = time.perf_counter()
    try:
        counts = write_shapes(args.out, args.split, args.n, args.seed, args.image_size, args.workers)
    except ValueError as error:
        raise SystemExit(f"unifier data shapes: {error}") from error
    seconds = time.perf_counter() - start
    summary = ", ".join(f"{value} {key}" for key, value in counts.items())
    print(f"wrote {args.out}/{args.split} in {seconds:.1f} s: {summary}")
    return 0
