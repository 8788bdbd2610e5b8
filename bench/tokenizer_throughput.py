"""python bench/tokenizer_throughput.py [--tokenizer runs/tokenizer-shapes] [--seconds 3] [--batch-size 32]

Prints the tokenizers' throughput on this machine:
- VQ-GAN encode and decode, images/s, at S=64 and S=256, on CPU and (when torch.cuda.is_available()) on the GPU;
  on CPU also the whole batch in one pass against the tokenizer's cache-sized chunks (CPU_CHUNK_PIXELS), as a ratio.
  Architectures: the shapes recipe's (tokenizers/shapes.yaml, or the --tokenizer folder's) and taming's
  ImageNet f16 VQ-GAN (the official 1024-code model's ddconfig) at S=256. Weights are random unless a
  tokenizer folder is given: throughput does not depend on their values.
- the sentencepiece text model: texts/s and tokens/s, one text per call and batched.
Figures are wall-clock and noisy when other jobs share the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import unifier.tokenization.image_tokenizer as image_tokenizer_module  # noqa: E402
from unifier.tokenization.build import load_recipe  # noqa: E402
from unifier.tokenization.image_tokenizer import ImageTokenizer  # noqa: E402

# taming-transformers' configs/vqgan_imagenet_f16_1024 (model.params.ddconfig): 256 x 256 -> 16 x 16 codes.
TAMING_IMAGENET_F16 = {
    "double_z": False,
    "z_channels": 256,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [16],
    "dropout": 0.0,
}


def timed(fn, seconds: float) -> tuple[int, float]:
    """Call fn() (after one warm-up call) until `seconds` pass; returns (calls, elapsed)."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls, elapsed


def bench_vqgan(name: str, tokenizer: ImageTokenizer, batch_size: int, seconds: float, device: str) -> None:
    tokenizer = tokenizer.to(device).eval()
    s = tokenizer.image_size
    images = torch.rand(batch_size, 3, s, s, device=device) * 2 - 1
    codes = tokenizer.encode(images)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def encode():
        tokenizer.encode(images)
        sync()

    def decode():
        tokenizer.decode(codes)
        sync()

    h, w = tokenizer.code_grid
    chunk = tokenizer.cpu_chunk_images
    for what, fn in (("encode", encode), ("decode", decode)):
        calls, elapsed = timed(fn, seconds)
        rate = calls * batch_size / elapsed
        how = f"chunks of {chunk}" if device == "cpu" and batch_size > chunk else "one pass"
        print(
            f"{name:<34} S={s:<4} {h}x{w:<3} codes  {device:<4} batch {batch_size:<3} {what}: {rate:9.1f} images/s"
            f" ({how})"
        )
        if device == "cpu" and batch_size > chunk:
            default = image_tokenizer_module.CPU_CHUNK_PIXELS
            image_tokenizer_module.CPU_CHUNK_PIXELS = batch_size * s**2  # the whole batch at once
            try:
                calls, elapsed = timed(fn, seconds)
            finally:
                image_tokenizer_module.CPU_CHUNK_PIXELS = default
            whole = calls * batch_size / elapsed
            print(
                f"{'':<34} {'':<6} {'':<11} {'':<4} batch {batch_size:<3} {what}: {whole:9.1f} images/s (one pass;"
                f" chunks {rate / whole:.2f}x)"
            )


def bench_text(sp, seconds: float) -> None:
    from unifier.data.shapes import corpus

    texts = list(corpus(seed=0, n_scenes=200))
    tokens = sum(len(ids) for ids in sp.encode(texts))

    def one_by_one():
        for text in texts:
            sp.encode(text)

    def batched():
        sp.encode(texts)

    for what, fn in (("one text per call", one_by_one), ("batched (sp.encode(list))", batched)):
        calls, elapsed = timed(fn, seconds)
        print(
            f"text sentencepiece ({sp.get_piece_size()} pieces) {what:<26}: "
            f"{calls * len(texts) / elapsed:10.0f} texts/s {calls * tokens / elapsed:11.0f} tokens/s"
        )
    ids = sp.encode(texts)
    calls, elapsed = timed(lambda: sp.decode(ids), seconds)
    print(f"text sentencepiece decode, batched                      : {calls * len(texts) / elapsed:10.0f} texts/s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    parser.add_argument("--tokenizer", default=None, help="a built tokenizer folder (default: random weights)")
    parser.add_argument("--recipe", default=str(REPO / "tokenizers" / "shapes.yaml"))
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-imagenet", action="store_true", help="skip taming's large ImageNet architecture")
    args = parser.parse_args(argv)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, devices: {', '.join(devices)}")
    if args.tokenizer:
        from unifier.tokenization import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        image = tokenizer.image_tokenizer
        ddconfig, n_embed, embed_dim, sp = image.ddconfig, image.n_embed, image.embed_dim, tokenizer.vocab.sp
    else:
        from unifier.tokenization.build import text_corpus
        from unifier.tokenization.text import train_text_model

        recipe = load_recipe(args.recipe)
        ddconfig, n_embed, embed_dim = (recipe["image"][k] for k in ("ddconfig", "n_embed", "embed_dim"))
        text = recipe["text"]
        with tempfile.TemporaryDirectory() as tmp:
            sp = train_text_model(
                text_corpus(recipe), Path(tmp) / "t.model", vocab_size=text["vocab_size"], **text["options"]
            )
        image = None
    for device in devices:
        for size in (64, 256):
            if image is not None and size == image.image_size:
                model = image
            else:
                model = ImageTokenizer({**ddconfig, "resolution": size}, n_embed, embed_dim)
            batch = args.batch_size if size == 64 else max(1, args.batch_size // 8)
            bench_vqgan("shapes recipe VQ-GAN", model, batch, args.seconds, device)
        if not args.skip_imagenet:
            bench_vqgan(
                "taming ImageNet f16 VQ-GAN (1024)",
                ImageTokenizer(TAMING_IMAGENET_F16, 1024, 256),
                2,
                args.seconds,
                device,
            )
    bench_text(sp, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
