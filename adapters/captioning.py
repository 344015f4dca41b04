"""Captioning: a Grad-CAM++ heat map for every word of a caption (``multiexplain.adapters.captioning``).

The caption (given, or generated greedily / with beam search) is scored by ONE teacher-forced
forward pass: the score of token ``t`` is ``log p(token_t | image, tokens < t)``. One
:class:`~multiexplain.ExplainRequest` carries a target callable ``model_output -> (N, K)`` that
returns every token's log-probability, every multi-token word's (the sum of its tokens') and the
whole caption's, so all ``K`` maps come from that one forward through batched vector-Jacobian
products. The layer is the one resolver's ("auto"); nothing here chooses layers or computes maps.

Model families, recognised by architecture (``config.model_type``), so subclasses work:

* Hugging Face ``VisionEncoderDecoderModel`` (any vision encoder + a text decoder) and BLIP
  (``BlipForConditionalGeneration``), with their processor / tokenizer;
* any other PyTorch captioner that follows this small protocol (the shipped Show-Attend-Tell does):

  - ``model(images, input_ids) -> logits (N, T, V)`` (or an output whose ``logits`` / first
    element is that), position ``t`` predicting token ``t + 1``, teacher-forced;
  - ``tokenizer`` with ``bos_token_id``, ``eos_token_id`` (or ``None``), ``encode(text,
    add_special_tokens=False) -> ids`` and ``decode(ids) -> text`` (``convert_ids_to_tokens`` and
    ``special_ids`` / ``all_special_ids`` are used when present);
  - optionally ``model.generate(images, max_length=..., num_beams=...) -> (N, L)`` ids starting
    with ``bos_token_id`` (without it, pass ``caption=``);
  - optionally ``model.image_size`` (the side it takes) and ``model.explain_layer`` (its layer;
    otherwise "auto" probes for it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from multiexplain.explain import ExplainRequest, Explanation, explain_request, method_names, model_logits
from multiexplain.explain.capture import Element
from multiexplain.explain.layers import LayerSpec, Reshape

__all__ = ["SCORES", "CaptionExplanation", "caption_scores", "explain_caption"]


@dataclass
class CaptionExplanation(Explanation):
    """Per-word explanation of one image's caption by one method: the shared fields for the ``W``
    words -- ``maps (W, H, W_img)`` in ``[0, 1]``, ``raw (W, h, w)``, ``weights (W, C)``, ``scores (W,)``
    word log-probabilities (sums of logits with ``score="logit"``), ``targets`` ``None``,
    ``zero_gradient (W,)`` -- plus the caption's view. Tensors live on the model's device.

    Attributes:
        image: ``(3, H, W)`` the image as the model saw it (after the processor), in ``[0, 1]``.
        caption: the explained caption (decoded, without special tokens).
        words: the ``W`` explained words (sub-word tokens merged; special tokens only with
            ``include_special=True``); ``word_tokens``: for each word, its indices into ``tokens``.
        tokens, token_ids: the ``T`` scored tokens (every token after the start token).
        token_maps, token_raw, token_scores: the same per token (``None`` with ``token_maps=False``).
        caption_map, caption_raw, caption_score: the whole caption's log-probability (the paper's score).
        generated: True when the model wrote the caption.
    """

    image: Tensor | None = None
    caption: str = ""
    words: list[str] = field(default_factory=list)
    word_tokens: list[list[int]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    token_ids: Tensor | None = None
    token_maps: Tensor | None = None
    token_raw: Tensor | None = None
    token_scores: Tensor | None = None
    caption_map: Tensor | None = None
    caption_raw: Tensor | None = None
    caption_score: Tensor | None = None
    generated: bool = False

    def save_figure(self, path: str, *, caption_panel: bool = True, ncols: int = 5, **kwargs: Any) -> str:
        """PNG grid: the image, one overlay per word (the word as title), then the whole-caption
        map. Long captions wrap onto more rows. Returns the path written."""
        from multiexplain.viz import save_overlay_grid

        heatmaps, titles = list(self.maps), list(self.words)
        if caption_panel:
            heatmaps.append(self.caption_map)
            titles.append("whole caption")
        suptitle = f'{self.method}: "{self.caption}" (log p = {float(self.caption_score):.2f})'
        return save_overlay_grid(path, self.image, heatmaps, titles, ncols=ncols, suptitle=suptitle, **kwargs)


# -- one class per model family: images -> pixel values, captions <-> ids, teacher-forced inputs ---


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _as_float_images(images: Any) -> list[Tensor]:
    """Images as a list of ``(3, H, W)`` float tensors in ``[0, 1]`` (tensors, PIL images, arrays)."""
    import numpy as np

    if isinstance(images, Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        if batch.ndim != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(f"expected images (3, H, W) or (N, 3, H, W), got shape {tuple(images.shape)}")
        batch = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
        return [image.expand(3, -1, -1) for image in batch]
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _as_float_images(item)]
    if isinstance(images, str):
        raise TypeError(f"images must be tensors, PIL images or arrays, not a path ({images!r}); "
                        "read files with multiexplain.io.read_image")
    array = np.asarray(images.convert("RGB") if hasattr(images, "convert") else images)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3:
        raise ValueError(f"expected an image (H, W[, 3]), got an array of shape {array.shape}")
    tensor = torch.from_numpy(np.array(array[..., :3])).permute(2, 0, 1)  # a writable copy
    return [tensor.float() / 255 if tensor.dtype == torch.uint8 else tensor.float()]


class _Captioner:
    """What the adapter needs from a captioning model family."""

    start_id: int
    end_id: int | None
    special_ids: set[int]

    def __init__(self, model: nn.Module, processor: Any, tokenizer: Any):
        self.model, self.processor, self.tokenizer = model, processor, tokenizer
        self.device = _model_device(model)

    # images
    def pixel_values(self, images: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``(pixel_values (N, 3, H, W), display images (N, 3, H, W) in [0, 1])``."""
        raise NotImplementedError

    # text
    def content_ids(self, caption: str) -> list[int]:
        raise NotImplementedError

    def ids_for(self, caption: str) -> list[int]:
        """``start, content..., end`` for a caption given as text; clear errors for bad text."""
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"the caption to explain is empty ({caption!r}); pass text or caption=None to generate one")
        content = self.content_ids(caption)
        if not content:
            raise ValueError(f"the caption {caption!r} tokenizes to no tokens")
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is not None and unk in content:
            unknown = [w for w in caption.split() if unk in self.content_ids(w)]
            raise ValueError(
                f"the caption {caption!r} has words the tokenizer maps to its unknown token: {unknown}; "
                "the model cannot score them"
            )
        return [self.start_id, *content] + ([self.end_id] if self.end_id is not None else [])

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens([int(i) for i in ids]))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids if int(i) not in self.special_ids], skip_special_tokens=True).strip()

    def word_spans(self, ids: list[int]) -> list[tuple[str, list[int]]]:
        """Merge sub-word tokens ``ids`` into words: ``[(word, [positions in ids])]``.

        A token starts a new word when decoding the tokens up to it adds a space before it
        (works for WordPiece ``##`` pieces and byte-level BPE ``Ġ`` alike)."""
        spans: list[tuple[str, list[int]]] = []
        previous = ""
        for position in range(len(ids)):
            text = self._decode_prefix([int(i) for i in ids[: position + 1]])
            if spans and text.startswith(previous) and len(text) > len(previous) and not text[len(previous)].isspace():
                word, members = spans[-1]
                spans[-1] = (word + text[len(previous):], members + [position])
            else:
                piece = text[len(previous):] if text.startswith(previous) else self.tokenizer.decode([int(ids[position])])
                spans.append((piece.strip(), [position]))
            previous = text
        return spans

    def _decode_prefix(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    # model
    def generate(self, pixel_values: Tensor, **kwargs: Any) -> list[list[int]]:
        raise NotImplementedError

    def forward_inputs(self, pixel_values: Tensor, ids: Tensor, mask: Tensor) -> Any:
        """Inputs of the teacher-forced forward; ``ids`` ``(N, T)`` start with the start token."""
        raise NotImplementedError

    def trim(self, sequence: list[int]) -> list[int]:
        """A generated row cut after its first end token (padding dropped)."""
        out = [int(sequence[0])]
        for token in sequence[1:]:
            out.append(int(token))
            if self.end_id is not None and int(token) == self.end_id:
                break
        return out



class _ProtocolCaptioner(_Captioner):
    """A captioner that follows the module's small protocol (the shipped Show-Attend-Tell, a user's own)."""

    def __init__(self, model: nn.Module, processor: Any, tokenizer: Any):
        missing = [name for name in ("bos_token_id", "encode", "decode") if getattr(tokenizer, name, None) is None]
        if tokenizer is None or missing:
            raise TypeError(
                f"{type(model).__name__} is not a Hugging Face VisionEncoderDecoder or BLIP model, so it is explained "
                "through the captioner protocol (model(images, input_ids) -> logits (N, T, V)), which needs "
                f"tokenizer= with bos_token_id, eos_token_id, encode() and decode(); "
                + ("no tokenizer was given" if tokenizer is None else f"the tokenizer lacks {missing}")
            )
        super().__init__(model, processor, tokenizer)
        self.start_id, self.end_id = int(tokenizer.bos_token_id), getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        declared = getattr(tokenizer, "special_ids", None) or getattr(tokenizer, "all_special_ids", None)
        self.special_ids = set(declared) if declared else {i for i in (self.start_id, self.end_id, pad) if i is not None}

    def pixel_values(self, images: list[Tensor]) -> tuple[Tensor, Tensor]:
        size = getattr(self.model, "image_size", None)
        if isinstance(size, int):
            for image in images:
                if tuple(image.shape[1:]) != (size, size):
                    raise ValueError(f"this {type(self.model).__name__} takes {size}x{size} images, got {image.shape[1]}x{image.shape[2]}")
        if len({tuple(image.shape) for image in images}) > 1:
            raise ValueError("images of different sizes cannot form one batch; resize them to one size first")
        batch = torch.stack(images).to(self.device, _floating_dtype(self.model))
        return batch, batch.float().clamp(0, 1)

    def content_ids(self, caption: str) -> list[int]:
        try:
            return list(self.tokenizer.encode(caption, add_special_tokens=False))
        except TypeError:
            return list(self.tokenizer.encode(caption))

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        if hasattr(self.tokenizer, "convert_ids_to_tokens"):
            return list(self.tokenizer.convert_ids_to_tokens([int(i) for i in ids]))
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode([int(i) for i in ids if int(i) not in self.special_ids])).strip()

    def _decode_prefix(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids))

    def generate(self, pixel_values: Tensor, num_beams: int = 1, max_new_tokens: int | None = None,
                 max_length: int | None = None, **kwargs: Any) -> list[list[int]]:
        if not callable(getattr(self.model, "generate", None)):
            raise TypeError(f"{type(self.model).__name__} has no generate(); pass caption= to explain a given caption")
        if kwargs:
            raise TypeError(f"{type(self.model).__name__}.generate is called with num_beams and max_new_tokens, not {sorted(kwargs)}")
        rows = self.model.generate(pixel_values, max_length=max_new_tokens or max_length or 20, num_beams=num_beams)
        return [self.trim(row.tolist()) for row in rows]

    def forward_inputs(self, pixel_values: Tensor, ids: Tensor, mask: Tensor) -> Any:
        return (pixel_values, ids[:, :-1])

class _HuggingFaceCaptioner(_Captioner):
    """Shared by VisionEncoderDecoderModel and BlipForConditionalGeneration."""

    vision_config: Any

    def __init__(self, model: nn.Module, processor: Any, tokenizer: Any):
        tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise TypeError(f"{type(model).__name__} needs tokenizer= (or a processor that carries one)")
        super().__init__(model, processor, tokenizer)
        self.image_processor = getattr(processor, "image_processor", processor)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.vision_config.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def pixel_values(self, images: list[Tensor]) -> tuple[Tensor, Tensor]:
        if self.image_processor is None:
            # No processor: the tensors are taken as the model's pixel values.
            batch = torch.stack(images)
            mean = std = None
        else:
            arrays = [(image.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for image in images]
            batch = self.image_processor(images=arrays, return_tensors="pt")["pixel_values"]
            mean, std = self.image_processor.image_mean, self.image_processor.image_std
        if tuple(batch.shape[2:]) != self.image_size:
            raise ValueError(
                f"the model takes {self.image_size[0]}x{self.image_size[1]} pixel values but the image"
                f"{'s' if len(images) > 1 else ''} came out {batch.shape[2]}x{batch.shape[3]} "
                f"{'from the processor (does it resize?)' if self.image_processor is not None else '(no processor given to resize it)'}"
            )
        batch = batch.to(self.device, _floating_dtype(self.model))
        if mean is not None:
            display = batch.float() * torch.tensor(std, device=self.device).view(1, -1, 1, 1) + torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        else:
            low = batch.float().amin(dim=(1, 2, 3), keepdim=True)
            display = (batch.float() - low) / (batch.float().amax(dim=(1, 2, 3), keepdim=True) - low).clamp(min=1e-8)
        return batch, display.clamp(0, 1)

    def content_ids(self, caption: str) -> list[int]:
        return list(self.tokenizer(caption, add_special_tokens=False)["input_ids"])

    def generate(self, pixel_values: Tensor, **kwargs: Any) -> list[list[int]]:
        kwargs.setdefault("max_new_tokens", 20)
        rows = self.model.generate(pixel_values=pixel_values, **kwargs)
        rows = rows.sequences if hasattr(rows, "sequences") else rows
        return [self.trim(row.tolist()) for row in rows]


class _VisionEncoderDecoderCaptioner(_HuggingFaceCaptioner):
    def __init__(self, model: nn.Module, processor: Any, tokenizer: Any):
        super().__init__(model, processor, tokenizer)
        self.vision_config = model.config.encoder
        config, generation = model.config, getattr(model, "generation_config", None)

        def first(*names: str) -> int | None:
            for source in (config, config.decoder, generation, self.tokenizer):
                for name in names:
                    value = getattr(source, name, None) if source is not None else None
                    if value is not None:
                        return int(value[0] if isinstance(value, (list, tuple)) else value)
            return None

        start = first("decoder_start_token_id", "bos_token_id", "cls_token_id")
        if start is None:
            raise ValueError("the model's config sets no decoder_start_token_id (nor bos_token_id)")
        self.start_id, self.end_id = start, first("eos_token_id", "sep_token_id")
        pad = first("pad_token_id")
        self.special_ids = {i for i in (start, self.end_id, pad) if i is not None} | set(getattr(self.tokenizer, "all_special_ids", []))

    def forward_inputs(self, pixel_values: Tensor, ids: Tensor, mask: Tensor) -> Any:
        return {"pixel_values": pixel_values, "decoder_input_ids": ids[:, :-1], "decoder_attention_mask": mask[:, :-1]}


class _BlipCaptioner(_HuggingFaceCaptioner):
    def __init__(self, model: nn.Module, processor: Any, tokenizer: Any):
        super().__init__(model, processor, tokenizer)
        self.vision_config = model.config.vision_config
        text = model.config.text_config
        # BLIP's generate() puts bos_token_id first and stops at sep_token_id.
        self.start_id, self.end_id = int(text.bos_token_id), int(text.sep_token_id)
        self.special_ids = {self.start_id, self.end_id, int(text.pad_token_id)} | set(getattr(self.tokenizer, "all_special_ids", []))

    def forward_inputs(self, pixel_values: Tensor, ids: Tensor, mask: Tensor) -> Any:
        return {"pixel_values": pixel_values, "input_ids": ids[:, :-1], "attention_mask": mask[:, :-1]}


def _floating_dtype(model: nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


_FAMILIES: dict[str, type[_Captioner]] = {
    "vision-encoder-decoder": _VisionEncoderDecoderCaptioner,
    "blip": _BlipCaptioner,
}


def _captioner(model: nn.Module, processor: Any, tokenizer: Any) -> _Captioner:
    """The family of ``model`` by architecture (``config.model_type``), else the captioner protocol."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = _FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is not None:
        return family(model, processor, tokenizer)
    if model_type is not None and tokenizer is None:
        raise TypeError(
            f"{type(model).__name__} (model_type {model_type!r}) is not a supported Hugging Face captioner "
            f"(supported: {', '.join(sorted(_FAMILIES))}); a model that takes (images, input_ids) and returns "
            "logits (N, T, V) can be explained through the captioner protocol with tokenizer="
        )
    return _ProtocolCaptioner(model, processor, tokenizer)


# -- the teacher-forced scores -------------------------------------------------------------------

def caption_scores(logits: Tensor, ids: Tensor, mask: Tensor, score: str = "logprob") -> Tensor:
    """Token scores ``(N, T - 1)`` from teacher-forced logits ``(N, T - 1, V)``: the
    log-probabilities ``log p(ids[:, t + 1] | image, ids[:, :t + 1])`` (``score="logprob"``) or
    the pre-softmax logits of those tokens (``score="logit"``); 0 where ``mask[:, t + 1]`` is 0."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {SCORES}")
    # At least float32 (half-precision log-softmax loses small probabilities), float64 kept.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    per_class = torch.log_softmax(logits, dim=-1) if score == "logprob" else logits
    scores = per_class.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.where(mask[:, 1:].bool(), scores, torch.zeros_like(scores))


SCORES = ("logprob", "logit")


@dataclass
class _Plan:
    """What to explain for one image: token ids, which scored tokens count, and the words."""

    ids: list[int]
    scored: list[int]  # positions into ids[1:] that are explained as tokens
    words: list[tuple[str, list[int]]]  # word, indices into ``scored``
    generated: bool


def _plan(captioner: _Captioner, ids: list[int], include_special: bool, generated: bool) -> _Plan:
    predicted = ids[1:]
    scored = [t for t, token in enumerate(predicted) if include_special or token not in captioner.special_ids]
    if not scored:
        raise ValueError(
            "the caption has no words to explain"
            + (" (the model generated only special tokens; pass caption= or other generation arguments)" if generated else "")
        )
    words: list[tuple[str, list[int]]] = []
    run: list[int] = []  # consecutive non-special scored tokens, merged into words together

    def flush() -> None:
        if run:
            for word, members in captioner.word_spans([predicted[scored[i]] for i in run]):
                words.append((word, [run[m] for m in members]))
            run.clear()

    for index, t in enumerate(scored):
        if predicted[t] in captioner.special_ids:
            flush()
            words.append((captioner.convert_ids_to_tokens([predicted[t]])[0], [index]))
        else:
            run.append(index)
    flush()
    return _Plan(ids, scored, words, generated)


def _combination(
    plans: list[_Plan], length: int, device: torch.device, token_maps: bool
) -> tuple[Tensor, list[tuple[list[int] | None, list[int], int]]]:
    """Rows combining token log-probabilities into explained scores, ``(N, K, length)``: every
    scored token (if ``token_maps``), every word (a multi-token word is its tokens' sum; a
    one-token word reuses its token's row) and the whole caption (every predicted token).
    Also, per image, the row of each token (``None`` without token maps), word and the caption."""
    layouts, rows_per_image = [], []
    for plan in plans:
        rows: list[list[int]] = [[t] for t in plan.scored] if token_maps else []
        token_rows = list(range(len(plan.scored))) if token_maps else None
        word_rows = []
        for _word, members in plan.words:
            if token_rows is not None and len(members) == 1:
                word_rows.append(token_rows[members[0]])
            else:
                word_rows.append(len(rows))
                rows.append([plan.scored[m] for m in members])
        caption_row = len(rows)
        rows.append(list(range(len(plan.ids) - 1)))
        layouts.append((token_rows, word_rows, caption_row))
        rows_per_image.append(rows)
    k = max(len(rows) for rows in rows_per_image)
    matrix = torch.zeros(len(plans), k, length, device=device)
    for i, rows in enumerate(rows_per_image):
        for r, positions in enumerate(rows):
            matrix[i, r, positions] = 1.0
    return matrix, layouts




def explain_caption(
    model: nn.Module,
    images: Any,
    caption: str | Sequence[str] | None = None,
    *,
    processor: Any = None,
    tokenizer: Any = None,
    method: str | None = None,
    methods: Sequence[str] | None = None,
    target_layer: LayerSpec = "auto",
    reshape: Reshape | None = None,
    layer_call: int | None = None,
    element: Element = None,
    include_special: bool = False,
    token_maps: bool = True,
    score: str = "logprob",
    **generate_kwargs: Any,
) -> CaptionExplanation | list[CaptionExplanation] | dict[str, Any]:
    """Per-word (and whole-caption) maps of a caption over the image.

    Args:
        model: a Hugging Face ``VisionEncoderDecoderModel`` or BLIP captioner (with ``processor=``
            and/or ``tokenizer=``), or any captioner of the module's protocol (with ``tokenizer=``).
        images: one image (``(3, H, W)`` tensor in ``[0, 1]`` or uint8, PIL image, ``(H, W, 3)``
            array) -> one :class:`CaptionExplanation`; a batch (``(N, 3, H, W)`` tensor or a list)
            -> a list. Without a processor, tensors are used as the model's pixel values.
        caption: the caption to explain, one per image (a list) or one for all; ``None``: the
            model generates one (greedy by default; ``num_beams``, ``max_new_tokens`` and other
            generation arguments pass through ``generate_kwargs``).
        method / methods: one method (default ``"gradcam++"``) -> explanations; several
            (``methods=("gradcam++", "gradcam")``) -> ``{method: explanations}``, all from the same
            forward pass and gradients.
        target_layer, reshape, layer_call, element: the layer; ``"auto"`` is the one resolver's
            (BLIP's and VisionEncoderDecoder's final vision tokens, a protocol model's
            ``explain_layer``, else the probe).
        include_special: also explain special tokens (the end token) as words.
        token_maps: also compute every token's map; ``False`` computes only the words and the
            caption (fewer vector-Jacobian products when words are split into sub-words).
        score: ``"logprob"`` (log-probability of each token) or ``"logit"`` (its pre-softmax logit).
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {SCORES}")
    names, single_method = method_names(method, methods)
    captioner = _captioner(model, processor, tokenizer)
    single = (isinstance(images, Tensor) and images.ndim == 3) or not isinstance(images, (Tensor, list, tuple))
    float_images = _as_float_images(images)
    if not float_images:
        raise ValueError("no images given")
    pixel_values, display = captioner.pixel_values(float_images)
    n = pixel_values.shape[0]
    plans = _plans(captioner, pixel_values, caption, include_special, generate_kwargs)

    length = max(len(p.ids) for p in plans)
    pad = getattr(captioner.tokenizer, "pad_token_id", None) or 0
    ids = torch.full((n, length), int(pad), dtype=torch.long, device=captioner.device)
    mask = torch.zeros((n, length), dtype=torch.long, device=captioner.device)
    for i, plan in enumerate(plans):
        ids[i, : len(plan.ids)] = torch.tensor(plan.ids, device=captioner.device)
        mask[i, : len(plan.ids)] = 1
    matrix, layouts = _combination(plans, length - 1, captioner.device, token_maps)

    def explained_scores(output: Any) -> Tensor:
        """All K explained scores ``(N, K)`` from the ONE teacher-forced forward."""
        logits = model_logits(output)
        if logits.ndim != 3 or tuple(logits.shape[:2]) != (n, length - 1):
            raise ValueError(f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for {n} image(s) and "
                             f"{length - 1} input tokens; a captioner returns (N, T, vocabulary) teacher-forced logits")
        token_scores = caption_scores(logits, ids, mask, score)
        return torch.einsum("nkt,nt->nk", matrix.to(token_scores.dtype), token_scores)

    request = ExplainRequest(captioner.forward_inputs(pixel_values, ids, mask), explained_scores, target_layer,
                             reshape, layer_call, element, input_size=tuple(pixel_values.shape[2:]))
    try:
        explained = explain_request(model, request, names)
    except TypeError as error:
        if not isinstance(captioner, _ProtocolCaptioner):
            raise
        raise TypeError(f"{type(model).__name__} does not follow the captioner protocol "
                        f"model(images, input_ids) -> logits (N, T, V): {error}") from error
    results = {name: _collect(captioner, plans, layouts, explanation, display) for name, explanation in explained.items()}
    if single:
        results = {name: per_image[0] for name, per_image in results.items()}
    return results[names[0]] if single_method else results


def _plans(captioner: _Captioner, pixel_values: Tensor, caption: Any, include_special: bool, generate_kwargs: dict) -> list[_Plan]:
    """What to explain per image: the given captions, or the ones the model generates."""
    n = pixel_values.shape[0]
    if caption is None:
        modes = {module: module.training for module in captioner.model.modules()}
        try:
            with torch.no_grad():
                sequences = captioner.generate(pixel_values, **generate_kwargs)
        finally:  # generate() may switch modes; every submodule's flag is put back
            for module, mode in modes.items():
                module.training = mode
        return [_plan(captioner, row, include_special, True) for row in sequences]
    if generate_kwargs:
        raise TypeError(f"generation arguments {sorted(generate_kwargs)} given with a caption to explain")
    captions = [caption] * n if isinstance(caption, str) else list(caption)
    if len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images")
    return [_plan(captioner, captioner.ids_for(text), include_special, False) for text in captions]


def _collect(
    captioner: _Captioner,
    plans: list[_Plan],
    layouts: list[tuple[list[int] | None, list[int], int]],
    explanation: Explanation,
    display: Tensor,
) -> list[CaptionExplanation]:
    """One :class:`CaptionExplanation` per image from the batch's ``(N, K, ...)`` explanation."""
    results = []
    for i, (plan, (token_rows, word_rows, caption_row)) in enumerate(zip(plans, layouts)):
        maps, raw, weights, scores = (explanation.maps[i], explanation.raw[i], explanation.weights[i], explanation.scores[i])
        zero = explanation.zero_gradient[i]
        predicted = plan.ids[1:]
        token_ids = [predicted[t] for t in plan.scored]
        tokens = token_rows is not None
        results.append(CaptionExplanation(
            maps=maps[word_rows], raw=raw[word_rows], weights=weights[word_rows], scores=scores[word_rows], targets=None,
            zero_gradient=zero[word_rows], method=explanation.method, layer=explanation.layer,
            image=display[i], caption=captioner.decode(plan.ids), words=[word for word, _ in plan.words],
            word_tokens=[members for _, members in plan.words], tokens=captioner.convert_ids_to_tokens(token_ids),
            token_ids=torch.tensor(token_ids, device=scores.device),
            token_maps=maps[token_rows] if tokens else None, token_raw=raw[token_rows] if tokens else None,
            token_scores=scores[token_rows] if tokens else None,
            caption_map=maps[caption_row], caption_raw=raw[caption_row], caption_score=scores[caption_row],
            generated=plan.generated,
        ))
    return results
