"""`unifier tokenizer build`: recipe -> tokenizer folder, reuse, --force, interruption, loading errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_image_tokenizer import write_taming_checkpoint

from unifier import cli
from unifier.tokenization import IMAGE_TOKENIZER_DIR, TokenizerFolderError, load_tokenizer, vqgan_train
from unifier.tokenization import build as build_module
from unifier.tokenization.build import BuildError, RecipeError, build_tokenizer, load_recipe, main

REPO = Path(__file__).resolve().parents[1]

TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "text": {
        "corpus": "shapes",
        "shapes_scenes": 20,
        "vocab_size": 320,
        "extra_texts": [" what does the image describe?"],
        "options": {"model_type": "bpe"},
    },
    "bins": 100,
    "image": {
        "data": "shapes",
        "ddconfig": {
            "double_z": False,
            "z_channels": 8,
            "resolution": 32,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 32,
            "ch_mult": [1, 1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "n_embed": 32,
        "embed_dim": 4,
        "train": {
            "steps": 3,
            "batch_size": 4,
            "warmup_steps": 1,
            "autoencoder_warmup_steps": 1,
            "kmeans_images": 8,
            "kmeans_iterations": 2,
            "dead_code_reset_every": 1,
            "disc_start": 2,
            "save_every": 1,
            "log_every": 1,
        },
        "eval_scenes": 4,
    },
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny convolutions gain nothing from a second thread, and lose a lot when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_recipe(folder: Path, recipe=None, name="tiny.yaml", **changes) -> Path:
    recipe = json.loads(json.dumps(recipe or TINY_RECIPE))
    for dotted, value in changes.items():
        target = recipe
        *parents, last = dotted.split("__")
        for key in parents:
            target = target[key]
        target[last] = value
    path = folder / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("build")
    recipe = write_recipe(folder)
    out = folder / "runs" / "tokenizer-tiny"
    assert main(["build", str(recipe), "--out", str(out), "--quiet"]) == 0
    return recipe, out


def test_build_writes_a_complete_folder(built):
    recipe, out = built
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == [
        "build_info.json",
        "image_tokenizer/config.json",
        "image_tokenizer/model.safetensors",
        "recipe.yaml",
        "text.model",
        "vocab.json",
    ]
    assert not list(out.parent.glob(".tokenizer-tiny.partial-*"))  # the work folder was renamed into place
    stored = yaml.safe_load((out / "recipe.yaml").read_text())
    assert stored == load_recipe(recipe)  # the recipe used, defaults filled in
    info = json.loads((out / "build_info.json").read_text())
    assert info["vocab"]["codes"] == 32 and info["vocab"]["bins"] == 100
    assert info["image"]["train"]["steps"] == 3
    assert info["image"]["eval"]["clean_parse_accuracy"] == 1.0


def test_a_recipe_builds_the_same_vqgan_whatever_torch_s_generator_held(built, tmp_path):
    from safetensors.torch import load_file

    recipe, first = built
    torch.manual_seed(12345)  # torch starts every process at another seed; the build must not depend on it
    again = tmp_path / "again"
    assert main(["build", str(recipe), "--out", str(again), "--quiet"]) == 0
    weights = [load_file(folder / IMAGE_TOKENIZER_DIR / "model.safetensors") for folder in (first, again)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    state = torch.get_rng_state()
    other = build_module.untrained_image_tokenizer(load_recipe(recipe)["image"], seed=1)
    same_seed = build_module.untrained_image_tokenizer(load_recipe(recipe)["image"], seed=1)
    assert torch.equal(other.encoder.conv_in.weight, same_seed.encoder.conv_in.weight)
    assert not torch.equal(other.encoder.conv_in.weight, weights[0]["encoder.conv_in.weight"])  # seed 0's
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left alone


def test_built_folder_loads_and_round_trips(built):
    _, out = built
    tokenizer = load_tokenizer(out)
    assert tokenizer.folder == out
    assert tokenizer.code_grid == (8, 8) and tokenizer.num_image_tokens == 64
    vocab = tokenizer.vocab
    assert vocab.num_codes == tokenizer.image_tokenizer.n_embed == 32
    assert vocab.decode_text(vocab.encode_text("a small red circle")) == "a small red circle"
    from unifier.data.shapes import make_scene

    ids = tokenizer.image_ids([make_scene("val", 0, image_size=32).render()])
    assert len(ids) == 1 and len(ids[0]) == 64 and all(vocab.is_code(i) for i in ids[0])
    (image,) = tokenizer.images_from_ids(ids)
    assert image.size == (32, 32)


def test_same_recipe_reuses_the_build(built, capsys):
    recipe, out = built
    weights = out / "image_tokenizer" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(["build", str(recipe), "--out", str(out)]) == 0
    assert "reusing" in capsys.readouterr().err
    assert weights.stat().st_mtime_ns == before


def test_other_recipe_is_refused_unless_forced(built, tmp_path, capsys):
    _, out = built
    other = write_recipe(tmp_path, bins=200)
    assert main(["build", str(other), "--out", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert load_tokenizer(out).vocab.num_bins == 100

    copy = tmp_path / "copy"
    build_tokenizer(write_recipe(tmp_path, name="a.yaml"), copy, progress=False)
    old_hash = json.loads((copy / "build_info.json").read_text())["recipe_hash"]
    build_tokenizer(other, copy, force=True, progress=False)
    assert load_tokenizer(copy).vocab.num_bins == 200
    assert json.loads((copy / "build_info.json").read_text())["recipe_hash"] != old_hash
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".copy")) == [".copy.lock"]


def test_interrupted_build_leaves_no_finished_looking_folder_and_resumes(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "tok"
    real_batch = vqgan_train.ShapesImages.batch

    def interrupt_at_step_2(self, step, batch_size):
        if step == 2:
            raise KeyboardInterrupt
        return real_batch(self, step, batch_size)

    monkeypatch.setattr(vqgan_train.ShapesImages, "batch", interrupt_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        build_tokenizer(recipe, out, progress=False)
    assert not out.exists()
    (partial,) = tmp_path.glob(".tok.partial-*")
    assert not (partial / "recipe.yaml").exists() and not (partial / "vocab.json").exists()
    with pytest.raises(TokenizerFolderError, match="unfinished build"):
        load_tokenizer(out)

    monkeypatch.setattr(vqgan_train.ShapesImages, "batch", real_batch)
    build_tokenizer(recipe, out, progress=False)
    info = json.loads((out / "build_info.json").read_text())
    assert info["image"]["train"]["resumed_from"] == 2  # picked up the interrupted run's checkpoint
    assert not list(tmp_path.glob(".tok.partial-*"))
    load_tokenizer(out)


def test_killed_build_process_leaves_no_finished_looking_folder(tmp_path):
    recipe = write_recipe(tmp_path, image__train__steps=100_000)
    out = tmp_path / "tok"
    process = subprocess.Popen(
        [sys.executable, "-m", "unifier.cli", "tokenizer", "build", str(recipe), "--out", str(out), "--quiet"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not list(tmp_path.glob(".tok.partial-*/vqgan_run/checkpoint-*")):
            assert process.poll() is None, "the build ended before it could be killed"
            assert time.time() < deadline, "the build wrote no checkpoint in time"
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert not out.exists()
    with pytest.raises(TokenizerFolderError, match="unfinished build"):
        load_tokenizer(out)


def test_text_only_recipe_from_a_text_file(tmp_path):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("A man rides a horse on the beach.\nTwo dogs play in the snow.\n" * 30)
    recipe = {"text": {"corpus": str(corpus), "vocab_size": 300}, "bins": 50}
    out = build_tokenizer(write_recipe(tmp_path, recipe=recipe), tmp_path / "tok", progress=False)
    tokenizer = load_tokenizer(out)
    assert tokenizer.image_tokenizer is None and tokenizer.vocab.num_codes == 0 and tokenizer.vocab.num_bins == 50
    assert tokenizer.vocab.decode_text(tokenizer.vocab.encode_text("Two dogs play.")) == "Two dogs play."
    with pytest.raises(TokenizerFolderError, match="no image tokenizer"):
        _ = tokenizer.code_grid
    # a changed corpus file is a changed recipe
    corpus.write_text("something else entirely\n" * 30)
    with pytest.raises(BuildError, match="--force"):
        build_tokenizer(tmp_path / "tiny.yaml", tmp_path / "tok", progress=False)


def test_official_checkpoint_recipe(tmp_path):
    from unifier.data.shapes import vocabulary_texts
    from unifier.tokenization.text import train_text_model

    ckpt, config, _ = write_taming_checkpoint(tmp_path)
    text_model = tmp_path / "text.model"
    train_text_model(vocabulary_texts(), text_model, vocab_size=300)
    recipe = {
        "text": {"model_file": str(text_model)},
        "image": {"taming_checkpoint": str(ckpt), "taming_config": str(config), "eval_scenes": 0},
    }
    out = build_tokenizer(write_recipe(tmp_path, recipe=recipe), tmp_path / "tok", progress=False)
    tokenizer = load_tokenizer(out)
    assert tokenizer.vocab.num_codes == 16 and tokenizer.code_grid == (8, 8)
    assert (out / "text.model").read_bytes() == text_model.read_bytes()


def test_mismatched_or_incomplete_folders_fail_clearly(built, tmp_path):
    _, out = built
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    meta = json.loads((copy / "vocab.json").read_text())
    meta.update(num_codes=64, size=meta["size"] + 32)  # consistent on its own, not with the codebook
    (copy / "vocab.json").write_text(json.dumps(meta))
    with pytest.raises(TokenizerFolderError, match="num_codes=64.*n_embed=32"):
        load_tokenizer(copy)
    subprocess.run(["rm", "-r", str(copy / "image_tokenizer")], check=True)
    with pytest.raises(TokenizerFolderError, match="no image tokenizer"):
        load_tokenizer(copy)
    (copy / "vocab.json").unlink()
    with pytest.raises(TokenizerFolderError, match="no vocab.json"):
        load_tokenizer(copy)
    with pytest.raises(TokenizerFolderError, match="not found"):
        load_tokenizer(tmp_path / "nothing")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"colour": 1}, "unknown field"),
        ({"text__corpus": None}, "text.corpus"),
        ({"image__ddconfig__ch": 16}, "multiples of 32"),
        ({"image__train__stepz": 3}, "image.train: unknown field"),
        ({"image__n_embed": None}, "image.n_embed"),
        ({"bins": 1}, "bins"),
    ],
)
def test_recipe_errors_name_the_field(tmp_path, changes, message, capsys):
    recipe = json.loads(json.dumps(TINY_RECIPE))
    for dotted, value in changes.items():
        target = recipe
        *parents, last = dotted.split("__")
        for key in parents:
            target = target[key]
        if value is None:
            del target[last]
        else:
            target[last] = value
    path = write_recipe(tmp_path, recipe=recipe)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)
    assert main(["build", str(path), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert message.split(":")[0] in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_recipe_and_help(tmp_path, capsys):
    assert main(["build", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "recipe not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tokenizer", "build", "--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_shipped_shapes_recipe_is_valid():
    recipe = load_recipe(REPO / "tokenizers" / "shapes.yaml")
    # One location bin per pixel of the shapes world's 64-pixel scenes.
    assert recipe["image"]["data"] == "shapes" and recipe["bins"] == recipe["image"]["ddconfig"]["resolution"] == 64
    assert build_module.recipe_hash(recipe) == build_module.recipe_hash(
        load_recipe(REPO / "tokenizers" / "shapes.yaml")
    )


def test_recipe_from_a_base(tmp_path):
    base = write_recipe(tmp_path, name="base.yaml")
    (tmp_path / "sub").mkdir()
    longer = tmp_path / "sub" / "longer.yaml"
    longer.write_text("base: ../base.yaml\nname: longer\nimage:\n  train: {steps: 7, lr: 0.002}\n  n_embed: 48\n")
    recipe, original = load_recipe(longer), load_recipe(base)
    # Mappings merge at every depth: the base's other train fields and its ddconfig stay.
    assert recipe["name"] == "longer" and recipe["image"]["n_embed"] == 48
    assert recipe["image"]["train"]["steps"] == 7 and recipe["image"]["train"]["lr"] == 0.002
    assert recipe["image"]["train"]["batch_size"] == original["image"]["train"]["batch_size"]
    assert recipe["image"]["ddconfig"] == original["image"]["ddconfig"] and recipe["text"] == original["text"]
    assert "base" not in recipe and build_module.recipe_hash(recipe) != build_module.recipe_hash(original)

    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(build_module.RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("base: gone.yaml\nname: orphan\n")
    with pytest.raises(build_module.RecipeError, match=r"gone.yaml \(the base of .*orphan.yaml\)"):
        load_recipe(tmp_path / "orphan.yaml")
    (tmp_path / "typo.yaml").write_text("base: base.yaml\nimage: {trian: {steps: 3}}\n")
    with pytest.raises(build_module.RecipeError, match="trian"):
        load_recipe(tmp_path / "typo.yaml")


def test_shipped_full_recipe_trains_the_vqgan_longer():
    default, full = (
        load_recipe(REPO / "tokenizers" / "shapes.yaml"),
        load_recipe(REPO / "tokenizers" / "shapes-full.yaml"),
    )
    assert full["image"]["train"]["steps"] > default["image"]["train"]["steps"]
    assert full["image"]["train"]["disc_start"] < full["image"]["train"]["steps"]
    same = ("text", "bins", "seed")
    assert {k: full[k] for k in same} == {k: default[k] for k in same}
    assert full["image"]["ddconfig"] == default["image"]["ddconfig"]


def test_image_folder_recipe(tmp_path, capsys):
    from PIL import Image

    from unifier.data.shapes import make_scene

    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.fromarray(make_scene("train", i, image_size=48).render()).save(images / f"{i:03d}.png")
    recipe = write_recipe(tmp_path, image__data=str(images), image__train__steps=2)
    out = build_tokenizer(recipe, tmp_path / "tok", progress=False)
    info = json.loads((out / "build_info.json").read_text())
    assert info["image"]["train"]["steps"] == 2 and "eval" not in info["image"]
    assert load_tokenizer(out).image_tokenizer.image_size == 32  # folder images are resized to S

    missing = write_recipe(tmp_path, name="missing.yaml", image__data=str(tmp_path / "nowhere"))
    assert main(["build", str(missing), "--out", str(tmp_path / "other"), "--quiet"]) == 2
    assert "image folder not found" in capsys.readouterr().err


def test_training_rebuilds_a_folder_whose_recipe_changed(tmp_path):
    """train.py's tokenizer step: a folder built from the configured recipe file is reused while the file is
    unchanged and rebuilt once it changes; a folder built from another recipe is used as it is."""
    from unifier.train import TrainConfig, prepare_tokenizer

    recipe = write_recipe(tmp_path)
    out = tmp_path / "tok"
    config = TrainConfig(tokenizer=str(out), tokenizer_recipe=str(recipe))
    assert prepare_tokenizer(config, is_main=True) == out
    first = json.loads((out / "build_info.json").read_text())
    prepare_tokenizer(config, is_main=True)
    assert json.loads((out / "build_info.json").read_text()) == first  # reused
    assert load_tokenizer(out).vocab.num_bins == 100

    write_recipe(tmp_path, bins=64)
    prepare_tokenizer(config, is_main=True)
    assert json.loads((out / "build_info.json").read_text())["recipe_hash"] != first["recipe_hash"]
    assert load_tokenizer(out).vocab.num_bins == 64

    other = write_recipe(tmp_path, name="other.yaml", bins=32)
    prepare_tokenizer(TrainConfig(tokenizer=str(out), tokenizer_recipe=str(other)), is_main=True)
    assert load_tokenizer(out).vocab.num_bins == 64  # built from tiny.yaml: not this run's recipe to manage
