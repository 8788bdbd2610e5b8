"""The VQ-GAN image tokenizer: taming checkpoints, encode / decode, save / load, and its training loop."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2

from unifier.tokenization.image_tokenizer import ImageTokenizer, ImageTokenizerError, check_ddconfig
from unifier.tokenization.vqgan_train import (
    FolderImages,
    ShapesImages,
    VQGANTrainConfig,
    VQGANTrainError,
    _reset_dead_codes,
    build_lpips,
    kmeans_codebook,
    shapes_parse_accuracy,
    train_vqgan,
)

TINY = {
    "double_z": False,
    "z_channels": 8,
    "resolution": 16,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "dropout": 0.0,
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny convolutions gain nothing from a second thread, and lose a lot when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ModelCheckpoint:
    """Stands in for the Lightning callback class whose instances official taming checkpoints pickle."""

    def __init__(self, best_model_path):
        self.best_model_path = best_model_path


def write_taming_checkpoint(folder, n_embed=16, embed_dim=4, seed=0):
    """A taming VQModel checkpoint from taming's own modules, in the exact layout of the official ones:
    a Lightning dict with the model under "state_dict" (encoder., decoder., quant_conv., post_quant_conv.,
    quantize.embedding.weight, plus loss.* training weights) and the YAML config beside it."""
    torch.manual_seed(seed)
    modules = {
        "encoder": Encoder(**TINY),
        "decoder": Decoder(**TINY),
        "quantize": VectorQuantizer2(n_embed, embed_dim, beta=0.25),
        "quant_conv": torch.nn.Conv2d(TINY["z_channels"], embed_dim, 1),
        "post_quant_conv": torch.nn.Conv2d(embed_dim, TINY["z_channels"], 1),
    }
    with torch.no_grad():  # taming's init leaves the codebook nearly degenerate; spread it like a trained one
        modules["quantize"].embedding.weight.normal_()
    state = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    ckpt = {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": state,
        "callbacks": {ModelCheckpoint: {"best_model_path": "logs/last.ckpt"}},
        "hparams": ModelCheckpoint("x"),
    }
    ckpt_path, config_path = folder / "last.ckpt", folder / "model.yaml"
    torch.save(ckpt, ckpt_path)
    config = {
        "model": {
            "base_learning_rate": 4.5e-6,
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": embed_dim,
                "n_embed": n_embed,
                "ddconfig": TINY,
                "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", "params": {}},
            },
        }
    }
    config_path.write_text(yaml.safe_dump(config))
    for m in modules.values():
        m.eval()
    return ckpt_path, config_path, modules


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return write_taming_checkpoint(tmp_path_factory.mktemp("taming"))


def random_images(n, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_official_checkpoint_matches_taming_modules(official):
    ckpt_path, config_path, modules = official
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(ckpt_path, weights_only=True)  # the callbacks really are foreign classes
    tokenizer = ImageTokenizer.from_taming_checkpoint(ckpt_path, config_path)
    assert tokenizer.code_grid == (8, 8) and tokenizer.n_embed == 16 and tokenizer.image_size == 16
    x = random_images(3)
    with torch.no_grad():
        h = modules["quant_conv"](modules["encoder"](x))
        quant, _, (_, _, indices) = modules["quantize"](h)
        expected_codes = indices.view(3, 8, 8)
        expected_images = modules["decoder"](modules["post_quant_conv"](quant)).clamp(-1, 1)
    codes = tokenizer.encode(x)
    assert codes.dtype == torch.long and codes.shape == (3, 8, 8)
    assert torch.equal(codes, expected_codes)
    assert len(codes.unique()) > 1  # a real test: the codes differ across positions
    assert torch.allclose(tokenizer.decode(codes), expected_images, atol=1e-5)
    assert torch.allclose(tokenizer.decode(codes.flatten(1)), expected_images, atol=1e-5)


def test_official_checkpoint_config_forms_and_errors(official, tmp_path):
    ckpt_path, config_path, _ = official
    parsed = yaml.safe_load(config_path.read_text())
    for config in (parsed, parsed["model"]["params"], TINY):  # full YAML, params, bare ddconfig
        assert ImageTokenizer.from_taming_checkpoint(ckpt_path, config).n_embed == 16
    with pytest.raises(ImageTokenizerError, match="16 x 4 codebook"):
        ImageTokenizer.from_taming_checkpoint(ckpt_path, {**parsed["model"]["params"], "n_embed": 1024})
    with pytest.raises(ImageTokenizerError, match="not found"):
        ImageTokenizer.from_taming_checkpoint(tmp_path / "missing.ckpt", config_path)
    with pytest.raises(ImageTokenizerError, match="shape mismatches"):
        ImageTokenizer.from_taming_checkpoint(ckpt_path, {**TINY, "z_channels": 16})
    gumbel = {"model": {"target": "taming.models.vqgan.GumbelVQ", "params": parsed["model"]["params"]}}
    with pytest.raises(ImageTokenizerError, match="only taming.models.vqgan.VQModel"):
        ImageTokenizer.from_taming_checkpoint(ckpt_path, gumbel)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ImageTokenizerError, match="not a readable torch checkpoint"):
        ImageTokenizer.from_taming_checkpoint(tmp_path / "junk.ckpt", config_path)
    bare = tmp_path / "bare.ckpt"  # a plain state dict with no quantizer
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, bare)
    with pytest.raises(ImageTokenizerError, match="quantize.embedding.weight"):
        ImageTokenizer.from_taming_checkpoint(bare, config_path)


def test_save_load_round_trip(official, tmp_path):
    tokenizer = ImageTokenizer.from_taming_checkpoint(*official[:2])
    tokenizer.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["code_grid"] == [8, 8] and config["n_embed"] == 16
    loaded = ImageTokenizer.load(tmp_path / "tok")
    x = random_images(2, seed=1)
    assert torch.equal(loaded.encode(x), tokenizer.encode(x))
    assert torch.equal(loaded.decode(tokenizer.encode(x)), tokenizer.decode(tokenizer.encode(x)))


def test_load_errors(official, tmp_path):
    with pytest.raises(ImageTokenizerError, match="not found"):
        ImageTokenizer.load(tmp_path)
    tokenizer = ImageTokenizer.from_taming_checkpoint(*official[:2])
    tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embed": 32}))
    with pytest.raises(ImageTokenizerError, match="shape mismatches"):
        ImageTokenizer.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "version": 7}))
    with pytest.raises(ImageTokenizerError, match="version"):
        ImageTokenizer.load(tmp_path)


def test_pil_and_array_batches_in_raster_order(official):
    tokenizer = ImageTokenizer.from_taming_checkpoint(*official[:2])
    x = random_images(5, seed=2)
    arrays = [((t.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy() for t in x]
    images = [Image.fromarray(a) if i % 2 else a for i, a in enumerate(arrays)]
    codes = tokenizer.encode_images(images, batch_size=2)
    assert len(codes) == 5 and all(len(c) == 64 for c in codes)
    exact = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1 for a in arrays])
    assert codes == tokenizer.encode(exact).flatten(1).tolist()  # row by row
    decoded = tokenizer.decode_codes(codes, batch_size=2)
    assert len(decoded) == 5 and decoded[0].size == (16, 16) and decoded[0].mode == "RGB"
    expected = ((tokenizer.decode(torch.tensor(codes)) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.asarray(decoded[3]), expected[3])
    assert tokenizer.encode_images([]) == []


def test_cpu_chunks_give_the_whole_batch_results(official, monkeypatch):
    import unifier.tokenization.image_tokenizer as module

    tokenizer = ImageTokenizer.from_taming_checkpoint(*official[:2])
    x = random_images(7, seed=3)
    monkeypatch.setattr(module, "CPU_CHUNK_PIXELS", 10**9)  # one pass over the batch
    whole_codes, whole_images = tokenizer.encode(x), tokenizer.decode(torch.arange(7 * 64).view(7, 8, 8) % 16)
    calls = []
    original = tokenizer.decoder.forward
    monkeypatch.setattr(tokenizer.decoder, "forward", lambda z: calls.append(len(z)) or original(z))
    monkeypatch.setattr(module, "CPU_CHUNK_PIXELS", 3 * 16 * 16)  # 3 images of 16 x 16 a chunk
    assert torch.equal(tokenizer.encode(x), whole_codes)
    chunked = tokenizer.decode(torch.arange(7 * 64).view(7, 8, 8) % 16)
    assert calls == [3, 3, 1]
    torch.testing.assert_close(chunked, whole_images, atol=1e-5, rtol=1e-5)


def test_bad_inputs_fail_clearly(official):
    tokenizer = ImageTokenizer.from_taming_checkpoint(*official[:2])
    with pytest.raises(ImageTokenizerError, match="shape"):
        tokenizer.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ImageTokenizerError, match=r"\[0, 16\)"):
        tokenizer.decode(torch.full((1, 8, 8), 16))
    with pytest.raises(ImageTokenizerError, match="needs 64"):
        tokenizer.decode_codes([[0] * 63])
    with pytest.raises(ImageTokenizerError, match="shape"):
        tokenizer.decode(torch.zeros(1, 7, 8, dtype=torch.long))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"double_z": True}, "double_z"),
        ({"ch": 16}, "multiples of 32"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"resolution": 15}, "multiple of the downsampling"),
        ({"out_ch": 1}, "RGB"),
    ],
)
def test_ddconfig_errors_name_the_field(change, message):
    with pytest.raises(ImageTokenizerError, match=message):
        check_ddconfig({**TINY, **change})
    with pytest.raises(ImageTokenizerError, match="resolution"):
        check_ddconfig({k: v for k, v in TINY.items() if k != "resolution"})


# ---- training ----------------------------------------------------------------------------------------
SHAPES_TINY = {**TINY, "resolution": 32, "attn_resolutions": []}


class InterruptingShapes(ShapesImages):
    """Shapes images that raise KeyboardInterrupt at one step, like a Ctrl-C mid-run."""

    interrupt_at: int | None = None

    def batch(self, step, batch_size):
        if step == self.interrupt_at:
            raise KeyboardInterrupt
        return super().batch(step, batch_size)


def tiny_config(**changes):
    values = dict(
        steps=6,
        batch_size=4,
        lr=1e-3,
        warmup_steps=2,
        autoencoder_warmup_steps=2,
        kmeans_images=8,
        kmeans_iterations=3,
        dead_code_reset_every=2,
        disc_start=3,
        save_every=2,
        log_every=1,
    )
    return VQGANTrainConfig.from_dict({**values, **changes})


@pytest.mark.parametrize("flat_cells", [False, True], ids=["plain", "flat_cells"])
def test_training_runs_every_loss_and_resumes_exactly(tmp_path, flat_cells):
    config = tiny_config(dead_code_reset_to="far" if flat_cells else "random")
    torch.manual_seed(0)
    straight = ImageTokenizer(SHAPES_TINY, 32, 4, legacy=False, flat_cells=flat_cells)
    initial = {k: v.clone() for k, v in straight.state_dict().items()}
    summary = train_vqgan(straight, InterruptingShapes(32), tmp_path / "straight", config, progress=False)
    assert summary["steps"] == 6 and summary["resumed_from"] is None
    final = summary["final"]
    assert final["d_weight"] > 0 and final["d_loss"] > 0 and final["codebook"] > 0  # GAN and VQ losses both on
    assert all(np.isfinite(v) for v in final.values())
    assert [p.name for p in (tmp_path / "straight").glob("checkpoint-*")] == ["checkpoint-0000006"]

    interrupted = ImageTokenizer(SHAPES_TINY, 32, 4, legacy=False, flat_cells=flat_cells)
    interrupted.load_state_dict(initial)
    source = InterruptingShapes(32)
    source.interrupt_at = 5
    with pytest.raises(KeyboardInterrupt):
        train_vqgan(interrupted, source, tmp_path / "resumed", config, progress=False)
    assert [p.name for p in (tmp_path / "resumed").glob("checkpoint-*")] == ["checkpoint-0000004"]
    resumed = ImageTokenizer(SHAPES_TINY, 32, 4, legacy=False, flat_cells=flat_cells)
    summary = train_vqgan(resumed, InterruptingShapes(32), tmp_path / "resumed", config, progress=False)
    assert summary["resumed_from"] == 4 and summary["steps"] == 6
    for key, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-6), key
    assert resumed.flat_codes == straight.flat_codes and bool(straight.flat_codes) == flat_cells

    with pytest.raises(VQGANTrainError, match="another configuration"):
        train_vqgan(resumed, InterruptingShapes(32), tmp_path / "resumed", tiny_config(lr=5e-4), progress=False)


# bf16 takes 10 s where the CPU has it and 146 s where it is emulated (an AVX2 CPU): slow there.
@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["fp32", "bf16"])
def test_training_reduces_reconstruction_error(tmp_path, bf16):
    torch.manual_seed(0)
    tokenizer = ImageTokenizer(SHAPES_TINY, 64, 8, legacy=False)
    images = ShapesImages(32)
    x = images.batch(10_000, 16)
    before = (tokenizer(x)[0] - x).abs().mean().item()
    config = tiny_config(steps=30, batch_size=8, autoencoder_warmup_steps=10, disc_start=20, save_every=100, bf16=bf16)
    train_vqgan(tokenizer, images, tmp_path / "run", config, progress=False)
    assert tokenizer.quantize.embedding.weight.dtype == torch.float32
    after = (tokenizer.decode(tokenizer.encode(x)) - x).abs().mean().item()
    assert after < 0.6 * before


def test_flat_cells_give_each_flat_colour_one_code(tmp_path):
    torch.manual_seed(0)
    tokenizer = ImageTokenizer(SHAPES_TINY, 32, 4, legacy=False, flat_cells=True)
    config = tiny_config(steps=12, disc_start=-1, save_every=100, dead_code_reset_to="far")
    train_vqgan(tokenizer, ShapesImages(32), tmp_path / "run", config, progress=False)
    x = ShapesImages(32).batch(10_000, 8)  # unseen scenes
    keys, codes = tokenizer.flat_cell_keys(x), tokenizer.encode(x)
    background = torch.mode(keys.flatten()).values.item()  # the shapes world's background colour
    assert background >= 0 and background in tokenizer.flat_codes
    for key in keys[keys >= 0].unique().tolist():  # every flat colour seen in training has exactly one code
        if key in tokenizer.flat_codes:
            assert set(codes[keys == key].tolist()) == {tokenizer.flat_codes[key]}
    plain = ImageTokenizer(SHAPES_TINY, 32, 4, legacy=False)
    plain.load_state_dict(tokenizer.state_dict())
    assert len(set(plain.encode(x)[keys == background].tolist())) > 1  # the same weights alone vary with context

    tokenizer.save(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["flat_cells"] is True and all(k.count(",") == 2 for k in config["flat_codes"])
    loaded = ImageTokenizer.load(tmp_path / "tok")
    assert loaded.flat_codes == tokenizer.flat_codes and torch.equal(loaded.encode(x), codes)


def test_flat_cell_keys_mark_only_cells_of_one_colour():
    tokenizer = ImageTokenizer(SHAPES_TINY, 8, 4)  # f = 2: a 32 x 32 image is 16 x 16 cells
    x = torch.full((1, 3, 32, 32), -1.0)
    x[0, 0, :4, :4] = 1.0  # cells (0, 0) .. (1, 1) pure red
    x[0, 1, 5, 5] = 1.0  # one pixel of cell (2, 2) green
    keys = tokenizer.flat_cell_keys(x)[0]
    assert keys.shape == (16, 16)
    assert keys[0, 0] == keys[1, 1] == 255 << 16 and keys[0, 2] == 0 and keys[2, 2] == -1
    assert (keys == -1).sum() == 1


def test_flat_codes_in_config_are_checked():
    config = ImageTokenizer(SHAPES_TINY, 8, 4, flat_cells=True, flat_codes={(1 << 16) | 2: 5}).config()
    assert config["flat_codes"] == {"1,0,2": 5}
    assert ImageTokenizer.from_config(config).flat_codes == {(1 << 16) | 2: 5}
    with pytest.raises(ImageTokenizerError, match="not 'r,g,b'"):
        ImageTokenizer.from_config({**config, "flat_codes": {"red": 5}})
    with pytest.raises(ImageTokenizerError, match="8-bit"):
        ImageTokenizer.from_config({**config, "flat_codes": {"1,0,300": 5}})


def test_far_dead_code_reset_picks_latents_the_live_codes_miss():
    tokenizer = ImageTokenizer(SHAPES_TINY, 8, 2)
    with torch.no_grad():
        tokenizer.quantize.embedding.weight.zero_()
    usage = torch.tensor([5, 0, 0, 0, 0, 0, 0, 0])  # only code 0 (at the origin) is live
    latents = torch.zeros(1, 2, 4, 4)  # (B, D, h, w): 15 latents on code 0, one far away
    latents[0, :, 3, 3] = torch.tensor([10.0, -10.0])
    assert _reset_dead_codes(tokenizer, latents, usage, torch.Generator().manual_seed(0), far=True) == 7
    moved = tokenizer.quantize.embedding.weight[1:]
    assert torch.allclose(moved, torch.tensor([10.0, -10.0]).expand(7, 2), atol=1.0)


def test_kmeans_finds_separated_clusters():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = centres.repeat(50, 1) + 0.1 * torch.randn(150, 2, generator=torch.Generator().manual_seed(0))
    found = kmeans_codebook(points, 3, 10, torch.Generator().manual_seed(1))
    assert torch.cdist(centres, found).min(1).values.max() < 0.5


def test_config_errors():
    with pytest.raises(VQGANTrainError, match="unknown field"):
        VQGANTrainConfig.from_dict({"stepz": 3})
    with pytest.raises(VQGANTrainError, match="autoencoder_warmup_steps"):
        VQGANTrainConfig.from_dict({"steps": 3, "autoencoder_warmup_steps": 3})
    with pytest.raises(VQGANTrainError, match="dead_code_reset_to must be random or far"):
        VQGANTrainConfig.from_dict({"dead_code_reset_to": "nearest"})


def test_folder_images_skip_unreadable_files(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "sub" / "deep.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "notes.txt").write_text("not an image")
    source = FolderImages(tmp_path, 16, seed=0)
    assert len(source.files) == 5
    with pytest.warns(UserWarning, match="broken.jpg"):
        batches = [source.batch(step, 4) for step in range(3)]
    assert all(b.shape == (4, 3, 16, 16) and b.min() >= -1 and b.max() <= 1 for b in batches)
    assert [p.name for p in source.bad_files] == ["broken.jpg"]
    assert torch.equal(source.batch(1, 4), batches[1])  # a pure function of the step


def test_folder_errors(tmp_path):
    with pytest.raises(VQGANTrainError, match="not found"):
        FolderImages(tmp_path / "missing", 16)
    with pytest.raises(VQGANTrainError, match="no image files"):
        FolderImages(tmp_path, 16)


def test_lpips_loads_local_weights_without_download(tmp_path):
    # torchvision's VGG-16 state-dict layout: features.<i> for its 13 convolutions (random values are enough)
    convs = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256)]
    convs += [(17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]
    features = {}
    for i, c_in, c_out in convs:
        features[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3) * (2 / (9 * c_in)) ** 0.5
        features[f"features.{i}.bias"] = torch.zeros(c_out)
    torch.save(features, tmp_path / "vgg16.pth")
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate([64, 128, 256, 512, 512])}
    torch.save(lins, tmp_path / "vgg.pth")
    lpips = build_lpips(tmp_path / "vgg.pth", tmp_path / "vgg16.pth")
    assert torch.equal(lpips.net.slice3.state_dict()["14.weight"], features["features.14.weight"])
    assert torch.equal(lpips.lin2.model[1].weight, lins["lin2.model.1.weight"])
    x, y = random_images(2, size=32), random_images(2, size=32, seed=5)
    assert lpips(x, x).abs().max() < 1e-6 and (lpips(x, y) > 0).all()
    config = tiny_config(
        steps=1, batch_size=2, autoencoder_warmup_steps=0, disc_start=-1, lpips_weights=str(tmp_path / "vgg.pth")
    )
    config.vgg16_weights = str(tmp_path / "vgg16.pth")
    summary = train_vqgan(
        ImageTokenizer(SHAPES_TINY, 16, 4), ShapesImages(32), tmp_path / "run", config, progress=False
    )
    assert summary["steps"] == 1 and np.isfinite(summary["final"]["l1"])
    with pytest.raises(VQGANTrainError, match="incomplete"):
        build_lpips(tmp_path / "vgg.pth")
    with pytest.raises(VQGANTrainError, match="not found"):
        build_lpips(tmp_path / "missing.pth")


def test_shapes_parse_accuracy_reports_clean_parse():
    torch.manual_seed(0)
    tokenizer = ImageTokenizer(SHAPES_TINY, 16, 4)
    result = shapes_parse_accuracy(tokenizer, n_scenes=6, batch_size=4)
    assert result["clean_parse_accuracy"] == 1.0 and result["n_scenes"] == 6
    assert 0.0 <= result["parse_accuracy"] <= 1.0 and result["codes_used"] >= 1
