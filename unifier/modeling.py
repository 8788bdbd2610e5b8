"""The Unifier model: one BART encoder-decoder that reads an image and a prompt and writes tokens of one vocabulary.

Transformers' one-file-per-model style. The encoder input is

    [image patch embeddings (P = (S / patch)^2)] + [prompt token embeddings (L)]      (B, P + L, d_model)

where a patch embedding is a small strided-convolution stem's feature (layer-normalised) + a learned row
embedding + a learned column embedding + the "image" type embedding, and a token embedding is the shared word embedding + the
"text" type embedding. BART's encoder then adds its own learned 1-D positions over the whole sequence.
Examples without an image (text-to-image prompts) keep their P positions but have them masked out; a batch in
which no example has an image (pixel_values None) leaves the P positions out altogether, its prompt tokens keeping
the positions P .. P + L they have beside an image, so a prompt encodes the same in either kind of batch.
The decoder is BART's, predicting over the one vocabulary (text | bins | codes) with an lm_head tied to the
shared embedding.

    config = UnifierConfig(vocab_size=len(vocab), d_model=256, image_size=64, patch_size=8)
    model = UnifierForConditionalGeneration(config)
    out = model(pixel_values=..., image_mask=..., input_ids=..., attention_mask=...,
                decoder_input_ids=..., labels=...)                   # out.loss, out.logits (B, T, V)
    encoder_outputs, full_mask = model.encode(pixel_values, image_mask, input_ids, attention_mask)
    ids = model.generate(encoder_outputs=encoder_outputs, attention_mask=full_mask, num_beams=4, ...)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BartModel,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.bart.modeling_bart import BartDecoder, BartEncoder, BartScaledWordEmbedding

logger = logging.getLogger(__name__)

IMAGE_TYPE, TEXT_TYPE = 0, 1
# Initial std of the row / column embeddings, against the unit-variance patch features they are added to. At
# BART's 0.02 they were 30x smaller than the features and stayed so: after 2400 steps on the shapes world the
# model still had no sense of where anything was (grounding Acc@0.5 3%, left / right questions at chance).
POSITION_INIT_STD = 0.5
MODEL_SIZES_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


@strict
class UnifierConfig(BartConfig):
    """BART's configuration plus the image stem and the vocabulary ranges.

    `text_size`, `num_bins`, `num_codes` describe the one vocabulary (text | bins | codes) so that a saved model
    knows which ids are bins and codes without its tokenizer; `label_smoothing` is the training loss's epsilon.
    """

    model_type = "unifier"

    image_size: int = 64
    patch_size: int = 8
    num_channels: int = 3
    stem_channels: int | None = None  # width of the stem's first conv; None: d_model / 2^(convs - 1)
    # Row / column embeddings start as "normal" (std POSITION_INIT_STD) or "sincos": sines and cosines of the row
    # (first half of the dimensions) and the column (second half), at the same std. Sinusoids make "further
    # right" a direction in the embedding from the first step, which box corners and "to the left of" read off.
    position_init: str = "normal"
    label_smoothing: float = 0.1
    text_size: int = 0
    num_bins: int = 0
    num_codes: int = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.position_init not in ("normal", "sincos"):
            raise ValueError(f"position_init must be normal or sincos, got {self.position_init!r}")
        if self.patch_size < 2 or self.patch_size & (self.patch_size - 1):
            raise ValueError(
                f"patch_size must be a power of two >= 2 (the stem halves the image), got {self.patch_size}"
            )

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


def sincos_positions(length: int, dim: int, half: int) -> torch.Tensor:
    """(length, dim) with unit std: sin / cos of position * frequency (geometric from 1 to 1 / length) in one half of
    the dimensions (half 0: the first, 1: the second) and zeros in the other, so that rows and columns added
    together stay apart."""
    quarter = dim // 4
    frequencies = (1.0 / length) ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter - 1))  # (dim/4,)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * frequencies[None] * math.pi / 2  # (length, dim/4)
    table = torch.zeros(length, dim, dtype=torch.float64)
    start = half * (dim // 2)
    table[:, start : start + quarter] = torch.sin(angles)
    table[:, start + quarter : start + 2 * quarter] = torch.cos(angles)
    return (table / table.std()).float()


@dataclass
class UnifierEncoderOutput(BaseModelOutput):
    """BART's encoder output plus the (B, P + L) attention mask of the image + prompt sequence it encoded.

    Carrying the mask lets `generate` (which only knows the prompt's (B, L) mask) find the full one.
    """

    attention_mask: torch.Tensor | None = None


@dataclass
class UnifierSeq2SeqLMOutput(Seq2SeqLMOutput):
    """Seq2SeqLMOutput plus `token_loss` (B, T): each target token's loss (0 on pads), for per-task losses."""

    token_loss: torch.Tensor | None = None


class UnifierImageEmbeddings(nn.Module):
    """(B, C, S, S) pixels in [-1, 1] -> (B, P, d_model) patch embeddings with 2-D positions and the image type.

    The stem is log2(patch) stride-2 3x3 convolutions with GroupNorm + GELU, then a 1x1 projection: a small
    convolutional stem trains better than a bare linear patchify (Xiao et al. 2021, "Early convolutions help
    transformers see better"). GroupNorm rather than BatchNorm keeps examples of a batch independent. The
    projection is layer-normalised so that the features keep one scale, which the 2-D position embeddings
    (POSITION_INIT_STD) are sized against.
    """

    def __init__(self, config: UnifierConfig):
        super().__init__()
        num_convs = int(math.log2(config.patch_size))
        first = config.stem_channels or max(32, config.d_model // 2 ** (num_convs - 1))
        widths = [min(config.d_model, first * 2**i) for i in range(num_convs)]
        layers: list[nn.Module] = []
        in_channels = config.num_channels
        for width in widths:
            layers += [
                nn.Conv2d(in_channels, width, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(math.gcd(32, width), width),
                nn.GELU(),
            ]
            in_channels = width
        layers.append(nn.Conv2d(in_channels, config.d_model, kernel_size=1))
        self.stem = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(config.d_model)
        self.row_embeddings = nn.Embedding(config.grid_size, config.d_model)
        self.col_embeddings = nn.Embedding(config.grid_size, config.d_model)
        self.grid_size = config.grid_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixel_values)  # (B, d, g, g)
        b, d, g, _ = x.shape
        if g != self.grid_size:
            raise ValueError(
                f"pixel_values of size {pixel_values.shape[-1]} give a {g}x{g} patch grid, the model expects "
                f"{self.grid_size}x{self.grid_size} (image_size in its config)"
            )
        x = self.norm(x.flatten(2).transpose(1, 2))  # (B, g*g, d), raster order
        rows = self.row_embeddings.weight[:, None, :].expand(g, g, d)  # (g, g, d): row r at [r, :]
        cols = self.col_embeddings.weight[None, :, :].expand(g, g, d)  # (g, g, d): col c at [:, c]
        return x + (rows + cols).reshape(g * g, d)


class UnifierEncoder(BartEncoder):
    """BART's encoder fed with [image patches] + [prompt tokens] as `inputs_embeds`.

    `generate` calls this module (through `get_encoder()`) with the prompt ids and mask plus the model kwargs
    `pixel_values` / `image_mask`, and hands its output's full attention mask on to the decoder.
    """

    def __init__(self, config: UnifierConfig):
        super().__init__(config)
        self.image_embeddings = UnifierImageEmbeddings(config)
        self.type_embeddings = nn.Embedding(2, config.d_model)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The encoder is a PreTrainedModel of its own: transformers initialises its modules with this method, and
        # only the modules that hold parameters themselves (the row / column nn.Embedding, not their parent).
        super()._init_weights(module)
        image = getattr(self, "image_embeddings", None)
        if image is not None and (module is image.row_embeddings or module is image.col_embeddings):
            if self.config.position_init == "sincos":
                half = 0 if module is image.row_embeddings else 1
                init.copy_(module.weight, sincos_positions(*module.weight.shape, half=half) * POSITION_INIT_STD)
            else:
                init.normal_(module.weight, mean=0.0, std=POSITION_INIT_STD)

    def embed(
        self,
        pixel_values: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the encoder input (B, P + L, d) and its attention mask (B, P + L); P = 0 without pixel_values."""
        text = self.embed_tokens(input_ids) + self.type_embeddings.weight[TEXT_TYPE]  # (B, L, d)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        if pixel_values is None:
            return text + self._text_position_shift(input_ids.shape[1]), attention_mask
        pixel_values = pixel_values.to(text.dtype)
        image = self.image_embeddings(pixel_values) + self.type_embeddings.weight[IMAGE_TYPE]  # (B, P, d)
        if image_mask is None:
            image_mask = torch.ones(image.shape[0], dtype=torch.bool, device=image.device)
        image_attention = image_mask.to(attention_mask.dtype)[:, None].expand(-1, image.shape[1])  # (B, P)
        return torch.cat([image, text], dim=1), torch.cat([image_attention, attention_mask], dim=1)

    def _text_position_shift(self, length: int) -> torch.Tensor:
        """(L, d) = position[P + i] - position[i]: BART adds position[i] to the i-th input, so a prompt sent without
        the P patch positions in front of it still gets the positions P + i it has after an image."""
        num_patches = self.image_embeddings.grid_size**2
        if num_patches + length > self.config.max_position_embeddings:
            raise ValueError(
                f"a prompt of {length} tokens after {num_patches} image patches exceeds the encoder's "
                f"{self.config.max_position_embeddings} positions"
            )
        weight, offset = self.embed_positions.weight, self.embed_positions.offset
        return weight[offset + num_patches : offset + num_patches + length] - weight[offset : offset + length]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> UnifierEncoderOutput:
        """Encodes (B, P + L) positions; `attention_mask` of the output is the full (B, P + L) mask.

        With `inputs_embeds` (already the full sequence) the given `attention_mask` must be its full mask too.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("UnifierEncoder needs input_ids (the prompt) or inputs_embeds")
            inputs_embeds, attention_mask = self.embed(pixel_values, image_mask, input_ids, attention_mask)
        elif attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        out = super().forward(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        return UnifierEncoderOutput(
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            attention_mask=attention_mask,
        )


class UnifierPreTrainedModel(PreTrainedModel):
    config_class = UnifierConfig  # explicit: `from __future__ import annotations` makes the annotation a string
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = [r"BartEncoderLayer", r"BartDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True


class UnifierModel(UnifierPreTrainedModel):
    """Shared embedding, the image + prompt encoder and BART's decoder (the layout of `BartModel`, so a pretrained
    BART's `shared.*`, `encoder.*` and `decoder.*` weights load by name)."""

    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }

    def __init__(self, config: UnifierConfig):
        super().__init__(config)
        embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.shared = BartScaledWordEmbedding(config.vocab_size, config.d_model, config.pad_token_id, embed_scale)
        self.encoder = UnifierEncoder(config)
        self.decoder = BartDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.shared = value
        self.encoder.embed_tokens = value
        self.decoder.embed_tokens = value


def label_smoothed_loss(
    logits: torch.Tensor, labels: torch.Tensor, epsilon: float, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token loss (B, T): (1 - eps) * NLL + eps * mean over the allowed tokens of -log p; 0 where labels = -100.

    Equal to `F.cross_entropy(..., label_smoothing=eps, reduction="none")` when `allowed` is None. With `allowed`
    (B, T, V) bool, logits outside it are excluded and the smoothing mass spreads over the allowed tokens only
    (OFA's constrained training); torch's label smoothing would put mass on excluded tokens and give inf.
    """
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    log_probs = F.log_softmax(logits, dim=-1)  # (B, T, V)
    valid = labels.ne(-100)
    nll = -log_probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, T)
    if allowed is None:
        smooth = -log_probs.mean(-1)
    else:
        smooth = -log_probs.masked_fill(~allowed, 0.0).sum(-1) / allowed.sum(-1).clamp(min=1)
    loss = (1.0 - epsilon) * nll + epsilon * smooth
    return torch.where(valid, loss, torch.zeros_like(loss))


class UnifierForConditionalGeneration(UnifierPreTrainedModel, GenerationMixin):
    """The generalist model: `forward` for teacher-forced training, `encode` + `generate` for inference."""

    _tied_weights_keys = {"lm_head.weight": "model.shared.weight"}

    def __init__(self, config: UnifierConfig):
        super().__init__(config)
        self.model = UnifierModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_encoder(self, modality: str | None = None) -> UnifierEncoder:
        return self.model.encoder

    def get_decoder(self) -> BartDecoder:
        return self.model.decoder

    def encode(
        self,
        pixel_values: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> tuple[UnifierEncoderOutput, torch.Tensor]:
        """Run the encoder once: (encoder output with last_hidden_state (B, P + L, d), full mask (B, P + L)).

        Pass both to `generate(encoder_outputs=..., attention_mask=full_mask, ...)` or `forward`.
        """
        out = self.model.encoder(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_mask=image_mask
        )
        return out, out.attention_mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Any = None,
        labels: torch.LongTensor | None = None,
        allowed_tokens: torch.Tensor | None = None,
        allowed_rows: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> UnifierSeq2SeqLMOutput:
        """Logits (B, T, V) for decoder_input_ids (B, T); loss = mean label-smoothed CE over labels != -100.

        pixel_values (B, 3, S, S) in [-1, 1] or None; image_mask (B,) bool (False: no image for that example);
        input_ids / attention_mask (B, L): the prompt; labels (B, T) with -100 on pads (decoder_input_ids
        default to labels shifted right behind <s>). With `encoder_outputs` the encoder is skipped and
        `attention_mask` may be the full (B, P + L) mask or, when the output carries it, the prompt's.
        allowed_tokens (R, T', V) bool restricts the training loss of rows `allowed_rows` (R,) over their first
        T' positions to those tokens (closed-set tasks); it does not change the returned logits.
        """
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = shift_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        if encoder_outputs is None:
            encoder_outputs = self.model.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                image_mask=image_mask,
                **kwargs,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs[0])
        encoder_mask = self._encoder_mask(encoder_outputs, attention_mask)

        decoder_out = self.model.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=encoder_mask,
            cache=cache,
            use_cache=use_cache if labels is None else False,
            **kwargs,
        )
        logits = self.lm_head(decoder_out.last_hidden_state)  # (B, T, V)

        loss = token_loss = None
        if labels is not None:
            token_loss = label_smoothed_loss(logits, labels, self.config.label_smoothing)  # (B, T)
            if allowed_tokens is not None and allowed_rows is not None and len(allowed_rows):
                span = allowed_tokens.shape[1]
                constrained = label_smoothed_loss(
                    logits[allowed_rows, :span],
                    labels[allowed_rows, :span],
                    self.config.label_smoothing,
                    allowed_tokens,
                )
                positions = torch.arange(span, device=labels.device)
                token_loss = token_loss.index_put((allowed_rows[:, None], positions[None, :]), constrained)
            loss = token_loss.sum() / labels.ne(-100).sum().clamp(min=1)

        return UnifierSeq2SeqLMOutput(
            loss=loss,
            token_loss=token_loss,
            logits=logits,
            cache=decoder_out.cache,
            decoder_hidden_states=decoder_out.hidden_states,
            decoder_attentions=decoder_out.attentions,
            cross_attentions=decoder_out.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )

    @staticmethod
    def _encoder_mask(encoder_outputs: BaseModelOutput, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The (B, P + L) mask matching the encoder states: the given one if it fits, else the one they carry."""
        length = encoder_outputs.last_hidden_state.shape[1]
        if attention_mask is not None and attention_mask.shape[-1] == length:
            return attention_mask
        carried = getattr(encoder_outputs, "attention_mask", None)
        if carried is not None:
            return carried
        if attention_mask is None:
            return None
        raise ValueError(
            f"attention_mask has length {attention_mask.shape[-1]} but the encoder states have {length} positions: "
            "pass the full mask returned by model.encode(...)"
        )

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)


def shift_right(labels: torch.Tensor, pad_token_id: int, start_token_id: int) -> torch.Tensor:
    """(B, T) labels -> (B, T) decoder inputs: <s> + labels[:, :-1], -100 replaced by pad."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start_token_id
    return shifted.masked_fill(shifted.eq(-100), pad_token_id)


# ---- building ---------------------------------------------------------------------------------------------------------
def load_model_size(size: str | Path) -> dict[str, Any]:
    """A size name (tiny / base / large, from configs/model/) or a YAML path -> the config fields it sets."""
    path = Path(size)
    if not path.suffix:
        path = MODEL_SIZES_DIR / f"{size}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in MODEL_SIZES_DIR.glob("*.yaml"))
            raise ValueError(f"unknown model size {size!r}: no {path}; known sizes: {', '.join(known) or 'none'}")
    if not path.is_file():
        raise FileNotFoundError(f"model size file not found: {path}")
    fields = yaml.safe_load(path.read_text()) or {}
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: a model size file is a mapping of UnifierConfig fields, got {type(fields).__name__}")
    return fields


def build_config(size_or_config: str | Path | dict | UnifierConfig, vocab: Any, **overrides: Any) -> UnifierConfig:
    """A UnifierConfig for `vocab` (a UnifierVocab, or anything with `.vocab`) from a size, a dict or a config."""
    vocab = getattr(vocab, "vocab", vocab)
    if isinstance(size_or_config, UnifierConfig):
        fields = size_or_config.to_dict()
    elif isinstance(size_or_config, dict):
        fields = dict(size_or_config)
    else:
        fields = load_model_size(size_or_config)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    fields.update(
        vocab_size=vocab.size,
        text_size=vocab.text_size,
        num_bins=vocab.num_bins,
        num_codes=vocab.num_codes,
        pad_token_id=vocab.pad_id,
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eos_id,
        decoder_start_token_id=vocab.bos_id,
        forced_eos_token_id=None,
    )
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    known = set(UnifierConfig.__dataclass_fields__) | {"attn_implementation"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"unknown model config field(s) {unknown}; UnifierConfig fields include d_model, encoder_layers, ..."
        )
    return UnifierConfig(**fields)


def build_model(
    size_or_config: str | Path | dict | UnifierConfig,
    vocab: Any,
    image_size: int | None = None,
    pretrained_bart: str | Path | None = None,
    **overrides: Any,
) -> UnifierForConditionalGeneration:
    """A freshly initialised model for `vocab`; `pretrained_bart` (a local folder or hub name) initialises the
    text transformer from BART's weights (see `init_from_bart`)."""
    config = build_config(size_or_config, vocab, image_size=image_size, **overrides)
    model = UnifierForConditionalGeneration(config)
    if pretrained_bart:
        init_from_bart(model, pretrained_bart, vocab)
    return model


def init_from_bart(model: UnifierForConditionalGeneration, source: str | Path, vocab: Any = None) -> dict[str, int]:
    """Copy a pretrained BART's transformer weights into `model` and map its embeddings onto our vocabulary.

    Layers, layer norms and positions (the first rows, where ours are fewer) load by name. The word embedding
    keeps BART's rows for pad / bos / eos / unk and, when BART's tokenizer loads from `source`, for every text
    piece with the same spelling (sentencepiece's "▁" is BART's "Ġ"); other rows (bins, codes, unmatched pieces)
    keep their fresh initialisation. Returns counts: {"copied_tensors", "mapped_tokens", "skipped_tensors"}.
    """
    bart = BartModel.from_pretrained(str(source))
    if bart.config.d_model != model.config.d_model:
        raise ValueError(f"BART at {source} has d_model {bart.config.d_model}, the model {model.config.d_model}")
    ours = model.model.state_dict()
    theirs = bart.state_dict()
    copied, skipped = 0, []
    with torch.no_grad():
        for name, tensor in theirs.items():
            if name.endswith("embed_tokens.weight") or name == "shared.weight":
                continue
            if name not in ours:
                skipped.append(name)
                continue
            target = ours[name]
            if target.shape == tensor.shape:
                target.copy_(tensor)
            elif name.endswith("embed_positions.weight") and target.shape[1:] == tensor.shape[1:]:
                rows = min(target.shape[0], tensor.shape[0])
                target[:rows].copy_(tensor[:rows])
            else:
                skipped.append(name)
                continue
            copied += 1
        mapping = _bart_token_mapping(bart, source, getattr(vocab, "vocab", vocab))
        shared = model.model.shared.weight
        source_rows = theirs["shared.weight"]
        for our_id, their_id in mapping.items():
            shared[our_id].copy_(source_rows[their_id])
    model.tie_weights()
    if skipped:
        logger.warning(
            "init_from_bart: %d tensors of %s did not fit and were skipped: %s", len(skipped), source, skipped[:5]
        )
    return {"copied_tensors": copied, "mapped_tokens": len(mapping), "skipped_tensors": len(skipped)}


def _bart_token_mapping(bart: BartModel, source: str | Path, vocab: Any) -> dict[int, int]:
    """Our id -> BART's id for the special tokens and, with BART's tokenizer at hand, identically spelled pieces."""
    cfg = bart.config
    mapping = {}
    for ours, theirs in ((0, cfg.pad_token_id), (1, cfg.bos_token_id), (2, cfg.eos_token_id)):
        if theirs is not None and theirs < cfg.vocab_size:
            mapping[ours] = theirs
    if vocab is None:
        return mapping
    try:
        from transformers import AutoTokenizer

        their_vocab = AutoTokenizer.from_pretrained(str(source)).get_vocab()
    except (OSError, ValueError, TypeError) as e:  # no tokenizer files at `source`: specials only
        logger.info("init_from_bart: no BART tokenizer at %s (%s); mapping special tokens only", source, e)
        return mapping
    if "<unk>" in their_vocab:
        mapping[vocab.unk_id] = their_vocab["<unk>"]
    for our_id in range(4, vocab.text_size):
        piece = vocab.sp.id_to_piece(our_id).replace("\u2581", "\u0120")
        if piece in their_vocab and their_vocab[piece] < cfg.vocab_size:
            mapping[our_id] = their_vocab[piece]
    return mapping


def load_pretrained(folder: str | Path, map_location: str = "cpu", **kwargs: Any):
    """A trained model folder (config.json + model.safetensors + tokenizer/) -> (model in eval mode, tokenizer)."""
    from unifier.tokenization import load_tokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Unifier model folder (runs/<name>/model)")
    model = UnifierForConditionalGeneration.from_pretrained(folder, **kwargs).to(map_location).eval()
    tokenizer = load_tokenizer(folder / "tokenizer", map_location=map_location)
    if len(tokenizer.vocab) != model.config.vocab_size:
        raise ValueError(
            f"{folder}: the tokenizer has {len(tokenizer.vocab)} ids but the model's vocabulary has "
            f"{model.config.vocab_size}: the folder mixes a model and a tokenizer of different runs"
        )
    return model, tokenizer


# So that AutoConfig / AutoModelForSeq2SeqLM.from_pretrained open a saved Unifier folder.
AutoConfig.register("unifier", UnifierConfig)
AutoModelForSeq2SeqLM.register(UnifierConfig, UnifierForConditionalGeneration)
