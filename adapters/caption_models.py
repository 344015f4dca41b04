"""How each captioning model family is fed (``multiexplain.adapters.caption_models``): an image (and
a prompt) in, the model's inputs and the image geometry out; captions <-> token ids; generation.

The explained sequence of one image is ``context + answer``: the context is what the model reads
before the answer (a start token; for a vision-language model the prompt with its image tokens),
the answer is the caption (given, or generated) ending with the end token. Only answer tokens are
explained. A family is recognised by architecture (``config.model_type``, so subclasses work);
any other captioner is explained through the protocol of :mod:`multiexplain.adapters.captioning`.

Geometry: a :class:`View` says which box of the ORIGINAL image one image the vision tower saw
shows (after the processor's resize, crop, padding or tiling), so the adapter can draw every map
on the user's image grid. :func:`place_on_image` does that drawing.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multiexplain.explain import MaxBatch

__all__ = ["Captioner", "Prepared", "View", "captioner_for", "place_on_image", "SUPPORTED_FAMILIES"]


# -- geometry -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class View:
    """The box of the original image, in its pixel coordinates, that one view the vision tower
    saw covers from edge to edge: ``(top, left, bottom, right)``. A box inside the image is a crop
    (or a tile), one reaching past it has padding."""

    top: float
    left: float
    bottom: float
    right: float

    @staticmethod
    def full(height: int, width: int) -> "View":
        return View(0.0, 0.0, float(height), float(width))

    def scaled(self, scale_y: float, scale_x: float, offset_y: float = 0.0, offset_x: float = 0.0) -> "View":
        """The box of a view given in a resized image's coordinates (``original = (y - offset) * scale``)."""
        return View((self.top - offset_y) * scale_y, (self.left - offset_x) * scale_x,
                    (self.bottom - offset_y) * scale_y, (self.right - offset_x) * scale_x)


def place_on_image(raw: Tensor, views: list[View], size: tuple[int, int]) -> Tensor:
    """Layer-resolution maps -> maps on the original image's pixel grid (not normalised).

    Args:
        raw: ``(K, h, w)`` for one view, or ``(K, P, h, w)`` for ``P`` views (tiles).
        views: the ``P`` views (one for an untiled input), in the layer's tile order.
        size: the original image's ``(H, W)``.

    Returns ``(K, H, W)``: each view's map resampled bilinearly (``align_corners=False``, as
    :func:`multiexplain.core.upsample_maps`) into its box and summed over the views that cover a
    pixel; pixels a view does not show get nothing from it.
    """
    grids = raw.unsqueeze(1) if raw.ndim == 3 else raw
    if grids.shape[1] != len(views):
        raise ValueError(f"{grids.shape[1]} tiles in the layer's maps for {len(views)} views of the image")
    height, width = size
    ys = torch.arange(height, device=raw.device, dtype=raw.dtype) + 0.5
    xs = torch.arange(width, device=raw.device, dtype=raw.dtype) + 0.5
    total = raw.new_zeros(raw.shape[0], height, width)
    for index, view in enumerate(views):
        v = (ys - view.top) / (view.bottom - view.top)  # 0..1 across the view
        u = (xs - view.left) / (view.right - view.left)
        inside = ((v >= 0) & (v <= 1))[:, None] & ((u >= 0) & (u <= 1))[None, :]
        grid = torch.stack(torch.broadcast_tensors(2 * u[None, :] - 1, 2 * v[:, None] - 1), dim=-1)
        sampled = F.grid_sample(grids[:, index : index + 1], grid.unsqueeze(0).expand(grids.shape[0], -1, -1, -1),
                                mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
        total = total + sampled * inside
    return total


def _resized_size(image_processor: Any, height: int, width: int) -> tuple[int, int]:
    """The size a Hugging Face image processor resizes an image of ``height x width`` to."""
    size = getattr(image_processor, "size", None)
    if not getattr(image_processor, "do_resize", True) or size is None:
        return height, width
    get = (lambda key: getattr(size, key, None)) if not isinstance(size, dict) else size.get
    if get("height") and get("width") and not get("shortest_edge"):
        return int(get("height")), int(get("width"))
    if get("shortest_edge"):
        short, long = sorted((height, width))
        new_short, new_long = int(get("shortest_edge")), int(int(get("shortest_edge")) * long / short)
        if get("longest_edge") and new_long > int(get("longest_edge")):
            new_short, new_long = int(int(get("longest_edge")) * short / long), int(get("longest_edge"))
        return (new_short, new_long) if height <= width else (new_long, new_short)
    if get("longest_edge"):
        scale = int(get("longest_edge")) / max(height, width)
        return round(height * scale), round(width * scale)
    return height, width


def processor_view(image_processor: Any, size: tuple[int, int], processed: tuple[int, int]) -> View:
    """The view a resize / centre-crop / pad-to-square image processor (ViT, BLIP, CLIP, SigLIP,
    LLaVA's) made of an image of ``size``, checked against the ``processed`` pixel size."""
    height, width = size
    top = left = 0.0
    if getattr(image_processor, "do_pad", False) and type(image_processor).__name__.startswith("LlavaImageProcessor"):
        side = max(height, width)  # LLaVA pads to a square first, the image centred
        top, left = -((side - height) // 2), -((side - width) // 2)
        height = width = side
    resized_h, resized_w = _resized_size(image_processor, height, width)
    crop_top = crop_left = 0
    out_h, out_w = resized_h, resized_w
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop is not None:
        get = (lambda key: getattr(crop, key, None)) if not isinstance(crop, dict) else crop.get
        out_h, out_w = int(get("height")), int(get("width"))
        crop_top = int((resized_h - out_h) / 2.0) if out_h <= resized_h else -((out_h - resized_h) // 2)
        crop_left = int((resized_w - out_w) / 2.0) if out_w <= resized_w else -((out_w - resized_w) // 2)
    if (out_h, out_w) != tuple(processed):
        warnings.warn(
            f"{type(image_processor).__name__} turned a {size[0]}x{size[1]} image into {processed[0]}x{processed[1]} "
            f"pixels, not the {out_h}x{out_w} its settings imply; the maps are drawn as if it resized the whole image",
            RuntimeWarning,
        )
        return View.full(*size)
    scale_y, scale_x = height / resized_h, width / resized_w
    box = View(crop_top, crop_left, crop_top + out_h, crop_left + out_w).scaled(scale_y, scale_x)
    return View(box.top + top, box.left + left, box.bottom + top, box.right + left)


# -- images in ------------------------------------------------------------------------------------

def as_float_images(images: Any) -> list[Tensor]:
    """Images as a list of ``(3, H, W)`` float tensors (tensors, PIL images, arrays); uint8 -> ``[0, 1]``."""
    import numpy as np

    if isinstance(images, Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        if batch.ndim != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(f"expected images (3, H, W) or (N, 3, H, W), got shape {tuple(images.shape)}")
        batch = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
        return [image.expand(3, -1, -1) for image in batch]
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in as_float_images(item)]
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


def _uint8_array(image: Tensor) -> Any:
    return (image.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _floating_dtype(model: nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


@dataclass
class Prepared:
    """One image made ready for the model.

    Attributes:
        inputs: the model's image inputs (``pixel_values`` and the like, batch axis 1) and any
            other inputs that do not grow with the answer (InstructBLIP's Q-Former prompt).
        context: token ids of the explained sequence before the answer.
        token_inputs: per-token inputs of the context (``token_type_ids``, ...), lists as long as
            ``context``; the answer's entries come from :meth:`Captioner.answer_token_value`.
        views: where each tile of the explained layer lies in the original image.
        input_size: the spatial size of what the vision tower saw: ``(h, w)``, or ``(tiles, h, w)``.
        image: ``(3, H, W)`` the original image in ``[0, 1]``, the grid the maps are drawn on.
        identity: the model saw the image itself (no resize): maps need no resampling.
    """

    inputs: dict[str, Any]
    context: list[int]
    views: list[View]
    input_size: tuple[int, ...]
    image: Tensor
    token_inputs: dict[str, list[int]] = field(default_factory=dict)
    identity: bool = False

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])


# -- the families -------------------------------------------------------------------------------------

class Captioner:
    """What the adapter needs from a captioning model family."""

    #: Images of one size may share one forward pass (else one image per pass).
    batched = False
    #: Prompts are supported (``prompt=``).
    prompts = True
    #: What ``max_batch="auto"`` runs as: all of a caption's words in one batched backward pass. The
    #: gradient of a word reaches the image through a head, an LSTM or cross-attention projections,
    #: which batch well (on BLIP, CPU-sized chunks ran slower than whole batches in quick checks).
    default_max_batch: MaxBatch = None

    def __init__(self, model: nn.Module, processor: Any, tokenizer: Any):
        self.model, self.processor = model, processor
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        if self.tokenizer is None:
            raise TypeError(f"{type(model).__name__} needs tokenizer= (or a processor that carries one)")
        self.image_processor = getattr(processor, "image_processor", processor)
        self.device = _model_device(model)
        self.end_ids: list[int] = []
        self.special_ids: set[int] = set()

    @property
    def output_head(self) -> nn.Module | None:
        """The position-wise token head whose output is the model's logits, when the family names it
        (``None``: unknown, so the explainer differentiates the scores without crossing it once)."""
        return None

    # -- text -----------------------------------------------------------------------------------
    @property
    def end_id(self) -> int | None:
        return self.end_ids[0] if self.end_ids else None

    def _collect_specials(self, *ids: Any) -> set[int]:
        found = set(getattr(self.tokenizer, "all_special_ids", None) or [])
        for value in ids:
            for item in value if isinstance(value, (list, tuple, set)) else [value]:
                if item is not None:
                    found.add(int(item))
        return found

    def content_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def answer_ids(self, caption: str) -> list[int]:
        """``content..., end`` for an answer given as text; clear errors for text the model cannot score."""
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"the caption to explain is empty ({caption!r}); pass text, or caption=None to generate one")
        content = self.content_ids(caption)
        if not [token for token in content if token not in self.special_ids]:
            raise ValueError(f"the caption {caption!r} tokenizes to no word tokens")
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is not None and unk in content:
            unknown = [w for w in caption.split() if unk in self.content_ids(w)]
            raise ValueError(f"the caption {caption!r} has words the tokenizer maps to its unknown token: {unknown}; "
                             "the model cannot score them")
        return content + ([self.end_id] if self.end_id is not None else [])

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        if hasattr(self.tokenizer, "convert_ids_to_tokens"):
            return [str(t) for t in self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])]
        return [str(self.tokenizer.decode([int(i)])) for i in ids]

    def decode(self, ids: list[int]) -> str:
        kept = [int(i) for i in ids if int(i) not in self.special_ids]
        try:
            return str(self.tokenizer.decode(kept, skip_special_tokens=True)).strip()
        except TypeError:
            return str(self.tokenizer.decode(kept)).strip()

    def decode_prefix(self, ids: list[int]) -> str:
        try:
            return str(self.tokenizer.decode(ids, clean_up_tokenization_spaces=False))
        except TypeError:
            return str(self.tokenizer.decode(ids))

    def word_spans(self, ids: list[int]) -> list[tuple[str, list[int]]]:
        """Merge sub-word tokens into words: ``[(word, [positions in ids])]``.

        A token starts a new word when decoding the tokens up to it adds whitespace before it
        (WordPiece ``##`` pieces and byte-level BPE ``Ġ`` alike); a token that adds only whitespace
        (a double space) joins the next word, so no word is empty."""
        spans: list[tuple[str, list[int]]] = []
        pending: list[int] = []  # whitespace-only tokens waiting for the next word
        previous = ""
        for position in range(len(ids)):
            text = self.decode_prefix([int(i) for i in ids[: position + 1]])
            consistent = text.startswith(previous)
            piece = text[len(previous):] if consistent else self.decode_prefix([int(ids[position])])
            previous = text
            if not piece.strip():
                pending.append(position)
                continue
            if spans and consistent and not piece[0].isspace() and not pending:
                word, members = spans[-1]
                spans[-1] = (word + piece.rstrip(), members + [position])
            else:
                spans.append((piece.strip(), pending + [position]))
                pending = []
        if pending and spans:
            word, members = spans[-1]
            spans[-1] = (word, members + pending)
        return spans

    # -- images and the model ----------------------------------------------------------------------
    def prepare(self, image: Tensor, prompt: str | None) -> Prepared:
        raise NotImplementedError

    def generate(self, prepared: Prepared, **kwargs: Any) -> list[int]:
        """The answer the model writes for ``prepared``: ids after the context, cut after the first end token."""
        raise NotImplementedError

    def forward_inputs(self, prepared: list[Prepared], ids: Tensor, mask: Tensor) -> Any:
        """Inputs of the teacher-forced forward of a batch; ``ids (N, T)`` are the whole
        sequences (context + answer), the last token is only predicted."""
        raise NotImplementedError

    def answer_token_value(self, key: str) -> int:
        """The value of the per-token input ``key`` at the answer's tokens."""
        return 0

    def cut(self, answer: list[int]) -> list[int]:
        out = []
        for token in answer:
            out.append(int(token))
            if int(token) in self.end_ids:
                break
        return out

    def _collate(self, prepared: list[Prepared], key: str) -> Tensor:
        return torch.cat([item.inputs[key] for item in prepared])


class ProtocolCaptioner(Captioner):
    """A captioner following the protocol of :mod:`multiexplain.adapters.captioning` (the shipped
    Show-Attend-Tell, a user's own): ``model(images, input_ids) -> logits (N, T, V)``."""

    batched = True

    def __init__(self, model: nn.Module, processor: Any, tokenizer: Any):
        missing = [name for name in ("bos_token_id", "encode", "decode") if getattr(tokenizer, name, None) is None]
        if tokenizer is None or missing:
            raise TypeError(
                f"{type(model).__name__} is not a captioner family multiexplain knows ({', '.join(SUPPORTED_FAMILIES)}), "
                "so it is explained through the captioner protocol (model(images, input_ids) -> logits (N, T, V)), which "
                "needs tokenizer= with bos_token_id, eos_token_id, encode() and decode(); "
                + ("no tokenizer was given" if tokenizer is None else f"the tokenizer lacks {missing}")
            )
        super().__init__(model, processor, tokenizer)
        self.start_id = int(tokenizer.bos_token_id)
        end = getattr(tokenizer, "eos_token_id", None)
        self.end_ids = [int(end)] if end is not None else []
        pad = getattr(tokenizer, "pad_token_id", None)
        declared = getattr(tokenizer, "special_ids", None) or getattr(tokenizer, "all_special_ids", None)
        self.special_ids = set(declared) if declared else {i for i in (self.start_id, end, pad) if i is not None}

    def content_ids(self, text: str) -> list[int]:
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(self.tokenizer.encode(text))

    def decode_prefix(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids))

    def prepare(self, image: Tensor, prompt: str | None) -> Prepared:
        """The image as the model's input: resized (bilinear, antialiased) to ``model.image_size``
        when the model declares one and the image has another size; the maps are drawn back on it."""
        size = tuple(int(s) for s in image.shape[1:])
        side = getattr(self.model, "image_size", None)
        pixels = image.unsqueeze(0).to(self.device, _floating_dtype(self.model))
        identity = not isinstance(side, int) or size == (side, side)
        if not identity:
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        context = [self.start_id] + (self.content_ids(prompt) if prompt else [])
        return Prepared({"images": pixels}, context, [View.full(*size)], tuple(pixels.shape[2:]), image.clamp(0, 1),
                        identity=identity)

    def generate(self, prepared: Prepared, num_beams: int = 1, max_new_tokens: int | None = None,
                 max_length: int | None = None, **kwargs: Any) -> list[int]:
        if not callable(getattr(self.model, "generate", None)):
            raise TypeError(f"{type(self.model).__name__} has no generate(); pass caption= to explain a given caption")
        if kwargs:
            raise TypeError(f"{type(self.model).__name__}.generate is called with num_beams and max_new_tokens, not {sorted(kwargs)}")
        if len(prepared.context) > 1:
            raise TypeError("a protocol captioner's generate() takes no prompt; pass caption= with prompt=")
        rows = self.model.generate(prepared.inputs["images"], max_length=max_new_tokens or max_length or 20, num_beams=num_beams)
        return self.cut(rows[0].tolist()[1:])

    def forward_inputs(self, prepared: list[Prepared], ids: Tensor, mask: Tensor) -> Any:
        return (self._collate(prepared, "images"), ids[:, :-1])


class _HuggingFace(Captioner):
    """Shared by the Hugging Face families: the processor makes the pixel values and the views."""

    @property
    def output_head(self) -> nn.Module | None:
        """``get_output_embeddings()``: the token head of every transformers language model (BLIP
        keeps it on its text decoder); a linear map per position, whose output is the logits."""
        for owner in (self.model, getattr(self.model, "text_decoder", None)):
            find = getattr(owner, "get_output_embeddings", None)
            head = find() if callable(find) else None
            if isinstance(head, nn.Module):
                return head
        return None

    def _pixels(self, image: Tensor, **kwargs: Any) -> dict[str, Any]:
        if self.image_processor is None:
            raise TypeError(f"{type(self.model).__name__} needs processor= (its image processor and tokenizer)")
        processor = self.processor if kwargs.get("text") is not None else self.image_processor
        out = processor(images=_uint8_array(image), return_tensors="pt", **kwargs)
        return dict(out)

    def _image_inputs(self, out: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
        inputs = {}
        for key, value in out.items():
            if key in ("input_ids", "attention_mask", "token_type_ids", "labels", "mm_token_type_ids") or key in drop:
                continue
            if isinstance(value, Tensor):
                value = value.to(self.device, _floating_dtype(self.model)) if value.is_floating_point() else value.to(self.device)
            inputs[key] = value
        return inputs

    def _teacher_forced(self, inputs: dict[str, Any], prepared: list[Prepared], ids: Tensor) -> dict[str, Any]:
        """``inputs`` of the one teacher-forced forward with no key-value cache (nothing is
        generated) and, where the forward can skip them, no logits for the context's positions."""
        forward = inspect.signature(self.model.forward).parameters
        if "use_cache" in forward or any(p.kind is p.VAR_KEYWORD for p in forward.values()):
            inputs["use_cache"] = False
        if "logits_to_keep" in forward and len({len(item.context) for item in prepared}) == 1:
            # Only the answer's positions are scored: no logits (N, T, vocabulary) for the prompt.
            inputs["logits_to_keep"] = ids.shape[1] - len(prepared[0].context)
        return inputs

    def _simple(self, image: Tensor, pixel_values: Tensor) -> tuple[list[View], tuple[int, ...]]:
        processed = tuple(int(s) for s in pixel_values.shape[-2:])
        return [processor_view(self.image_processor, tuple(image.shape[1:]), processed)], processed

    def _generate(self, prepared: Prepared, inputs: dict[str, Any], strip: int, **kwargs: Any) -> list[int]:
        kwargs.setdefault("max_new_tokens", 20)
        kwargs.setdefault("do_sample", False)
        rows = self.model.generate(**inputs, **kwargs)
        rows = rows.sequences if hasattr(rows, "sequences") else rows
        row = [int(t) for t in rows[0].tolist()]
        context = prepared.context
        if row[: len(context)] == context:  # decoder-only models return the prompt too
            row = row[len(context):]
        elif strip:
            row = row[strip:]
        return self.cut(row)


# -- encoder-decoder captioners: BLIP, VisionEncoderDecoder ---------------------------------------------

class _EncoderDecoder(_HuggingFace):
    batched = True
    vision_config: Any
    input_key = "input_ids"

    def prepare(self, image: Tensor, prompt: str | None) -> Prepared:
        context = [self.start_id] + (self.content_ids(prompt) if prompt else [])
        if self.image_processor is None:  # the tensor is taken as the model's pixel values
            size = self.vision_size
            if tuple(image.shape[1:]) != size:
                raise ValueError(f"the model takes {size[0]}x{size[1]} pixel values but the image is "
                                 f"{image.shape[1]}x{image.shape[2]} (no processor given to resize it)")
            low, high = image.amin(), image.amax()
            display = (image - low) / (high - low).clamp(min=1e-8)
            pixels = image.unsqueeze(0).to(self.device, _floating_dtype(self.model))
            return Prepared({"pixel_values": pixels}, context, [View.full(*size)], size, display, identity=True)
        pixel_values = self._pixels(image)["pixel_values"]
        if tuple(pixel_values.shape[-2:]) != self.vision_size:
            raise ValueError(
                f"the model takes {self.vision_size[0]}x{self.vision_size[1]} pixel values but the image came out "
                f"{pixel_values.shape[-2]}x{pixel_values.shape[-1]} from the processor (does it resize?)")
        views, processed = self._simple(image, pixel_values)
        inputs = {"pixel_values": pixel_values.to(self.device, _floating_dtype(self.model))}
        return Prepared(inputs, context, views, processed, image.clamp(0, 1))

    @property
    def vision_size(self) -> tuple[int, int]:
        size = self.vision_config.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def generate(self, prepared: Prepared, **kwargs: Any) -> list[int]:
        prompt = torch.tensor([prepared.context], device=self.device)
        inputs = {"pixel_values": prepared.inputs["pixel_values"]}
        if len(prepared.context) > 1:
            inputs[self.input_key] = prompt
        return self._generate(prepared, inputs, strip=1, **kwargs)


class _VisionEncoderDecoder(_EncoderDecoder):
    input_key = "decoder_input_ids"

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
        self.start_id = start
        end = first("eos_token_id", "sep_token_id")
        self.end_ids = [end] if end is not None else []
        self.special_ids = self._collect_specials(start, end, first("pad_token_id"))

    def forward_inputs(self, prepared: list[Prepared], ids: Tensor, mask: Tensor) -> Any:
        inputs = {"pixel_values": self._collate(prepared, "pixel_values"), "decoder_input_ids": ids[:, :-1],
                  "decoder_attention_mask": mask[:, :-1]}
        return self._teacher_forced(inputs, prepared, ids)


class _Blip(_EncoderDecoder):
    def __init__(self, model: nn.Module, processor: Any, tokenizer: Any):
        super().__init__(model, processor, tokenizer)
        self.vision_config = model.config.vision_config
        text = model.config.text_config
        # BLIP's generate() puts bos_token_id first and stops at sep_token_id.
        self.start_id, self.end_ids = int(text.bos_token_id), [int(text.sep_token_id)]
        self.special_ids = self._collect_specials(self.start_id, self.end_ids, text.pad_token_id)

    def forward_inputs(self, prepared: list[Prepared], ids: Tensor, mask: Tensor) -> Any:
        inputs = {"pixel_values": self._collate(prepared, "pixel_values"), "input_ids": ids[:, :-1], "attention_mask": mask[:, :-1]}
        return self._teacher_forced(inputs, prepared, ids)


# -- vision-language models: the image enters the language model as tokens -------------------------------

class _VisionLanguage(_HuggingFace):
    """A vision-language model whose language model reads ``context + answer`` (decoder-only):
    GIT, BLIP-2 / InstructBLIP (decoder-only language models), LLaVA, FastVLM, LLaVA-NeXT, PaliGemma,
    Qwen2-VL, Idefics3 / SmolVLM. One image per forward pass (image token counts differ)."""

    #: The processor's image placeholder in a prompt (``None``: the processor adds the image itself).
    image_token: str | None = "<image>"
    #: Each word's gradient crosses self-attention over every image and text position of the language
    #: model, and on a CPU a batch of all of them outgrows the caches (benchmarks/speed_captioning.py
    #: times all at once beside it): batches sized by the explainer's byte budget (auto_chunk), or
    #: single passes where a timed batch is slower per word (through vmap's per-cotangent fallbacks).
    default_max_batch: MaxBatch = "auto"

    def __init__(self, model: nn.Module, processor: Any, tokenizer: Any):
        super().__init__(model, processor, tokenizer)
        if self.image_processor is None or self.image_processor is self.tokenizer:
            raise TypeError(f"{type(model).__name__} needs processor= (its image processor and tokenizer), e.g. "
                            "AutoProcessor.from_pretrained(name)")
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        generation = getattr(model, "generation_config", None)
        ends = getattr(generation, "eos_token_id", None)
        if ends is None:
            ends = getattr(text, "eos_token_id", None) or getattr(self.tokenizer, "eos_token_id", None)
        self.end_ids = [int(e) for e in (ends if isinstance(ends, (list, tuple)) else [ends]) if e is not None]
        self.bos_id = getattr(text, "bos_token_id", None) or getattr(self.tokenizer, "bos_token_id", None)
        image_ids = [getattr(model.config, name, None) for name in ("image_token_id", "image_token_index")]
        self.special_ids = self._collect_specials(self.end_ids, self.bos_id, getattr(self.tokenizer, "pad_token_id", None), image_ids)

    # the prompt
    def prompt_text(self, prompt: str | None) -> str:
        """The text handed to the processor: the prompt as written when it holds the image token,
        else the processor's chat template around it, else the image token before it."""
        token = getattr(self.processor, "image_token", None) or self.image_token
        if prompt is not None and token and token in prompt:
            return prompt
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if template:
            content = [{"type": "image"}] + ([{"type": "text", "text": prompt}] if prompt else [])
            return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return f"{token}{prompt or ''}"

    def prepare(self, image: Tensor, prompt: str | None) -> Prepared:
        out = self._pixels(image, text=self.prompt_text(prompt))
        ids = out["input_ids"][0].tolist()
        token_inputs = {key: out[key][0].tolist() for key in ("token_type_ids", "mm_token_type_ids") if key in out}
        views, size = self.views(image, out)
        return Prepared(self._image_inputs(out), ids, views, size, image.clamp(0, 1), token_inputs)

    def views(self, image: Tensor, out: dict[str, Any]) -> tuple[list[View], tuple[int, ...]]:
        return self._simple(image, out["pixel_values"])

    # the model
    def _sequence_inputs(self, prepared: list[Prepared], ids: Tensor, mask: Tensor) -> dict[str, Any]:
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        for key in prepared[0].token_inputs:
            rows = []
            for item, row in zip(prepared, ids):
                values = item.token_inputs[key]
                values = values + [self.answer_token_value(key)] * (row.shape[0] - len(values))
                rows.append(values[: row.shape[0]])
            inputs[key] = torch.tensor(rows, device=self.device)
        return inputs

    def forward_inputs(self, prepared: list[Prepared], ids: Tensor, mask: Tensor) -> Any:
        inputs = {key: self._collate(prepared, key) if isinstance(value, Tensor) else value
                  for key, value in prepared[0].inputs.items()}
        inputs.update(self._sequence_inputs(prepared, ids[:, :-1], mask[:, :-1]))
        return self._teacher_forced(inputs, prepared, ids)

    def generate(self, prepared: Prepared, **kwargs: Any) -> list[int]:
        context = torch.tensor([prepared.context], device=self.device)
        inputs = {**prepared.inputs, **self._sequence_inputs([prepared], context, torch.ones_like(context))}
        return self._generate(prepared, inputs, strip=0, **kwargs)


class _Git(_VisionLanguage):
    """GIT: image tokens are prepended inside the model; the text starts with [CLS]."""

    image_token = None

    def prepare(self, image: Tensor, prompt: str | None) -> Prepared:
        out = self._pixels(image)
        start = getattr(self.model.config, "bos_token_id", None) or self.tokenizer.cls_token_id
        context = [int(start)] + (self.content_ids(prompt) if prompt else [])
        views, size = self._simple(image, out["pixel_values"])
        return Prepared(self._image_inputs(out), context, views, size, image.clamp(0, 1))


class _Blip2(_VisionLanguage):
    """BLIP-2 / InstructBLIP: the Q-Former's query outputs fill the image tokens before the text;
    without a prompt the sequence is the image tokens and the start token (as ``generate`` does)."""

    image_token = None

    def prepare(self, image: Tensor, prompt: str | None) -> Prepared:
        if not getattr(self.model.config, "use_decoder_only_language_model", True):
            raise TypeError(f"{type(self.model).__name__} with an encoder-decoder language model (Flan-T5) is not "
                            "supported yet; BLIP-2 / InstructBLIP with a decoder-only language model (OPT, Vicuna) are")
        out = self._pixels(image, text=prompt or "")
        ids = out["input_ids"][0].tolist()
        if prompt is None and self.bos_id is not None:
            image_id = getattr(self.model.config, "image_token_id", None) or getattr(self.model.config, "image_token_index", None)
            ids = [t for t in ids if t == image_id] + [int(self.bos_id)]
        views, size = self._simple(image, out["pixel_values"])
        return Prepared(self._image_inputs(out), ids, views, size, image.clamp(0, 1))


class _PaliGemma(_VisionLanguage):
    """PaliGemma: the prompt is a prefix the model reads both ways (``token_type_ids`` 0), the
    answer a suffix read causally (``token_type_ids`` 1)."""

    def prompt_text(self, prompt: str | None) -> str:
        token = getattr(self.processor, "image_token", None) or self.image_token
        return prompt if prompt is not None and token in prompt else f"{token}{prompt or ''}"

    def answer_token_value(self, key: str) -> int:
        return 1 if key == "token_type_ids" else 0


class _LlavaNext(_VisionLanguage):
    """LLaVA-NeXT: the base image (resized whole) plus tiles of a padded high-resolution copy."""

    def views(self, image: Tensor, out: dict[str, Any]) -> tuple[list[View], tuple[int, ...]]:
        from transformers.image_processing_utils import select_best_resolution

        height, width = (int(v) for v in image.shape[1:])
        processor = self.image_processor
        crop = getattr(processor, "crop_size", None)
        side = int(getattr(crop, "height", None) or (crop or {}).get("height") or out["pixel_values"].shape[-1])
        best_h, best_w = select_best_resolution((height, width), processor.image_grid_pinpoints)
        scale_w, scale_h = best_w / width, best_h / height
        if scale_w < scale_h:  # transformers' get_patch_output_size
            new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
        else:
            new_h, new_w = best_h, min(math.ceil(width * scale_h), best_w)
        paste_y, paste_x = (best_h - new_h) // 2, (best_w - new_w) // 2
        views = [View.full(height, width)]
        for row in range(best_h // side):
            for column in range(best_w // side):
                tile = View(row * side, column * side, (row + 1) * side, (column + 1) * side)
                views.append(tile.scaled(height / new_h, width / new_w, paste_y, paste_x))
        tiles = int(out["pixel_values"].shape[1])
        if tiles != len(views):
            raise ValueError(f"LLaVA-NeXT's processor made {tiles} tiles, not the {len(views)} its grid pinpoints imply")
        return views, (tiles, side, side)


class _Qwen2VL(_VisionLanguage):
    """Qwen2-VL: the image keeps its aspect ratio (resized to multiples of patch x merge pixels)."""

    image_token = "<|image_pad|>"

    def views(self, image: Tensor, out: dict[str, Any]) -> tuple[list[View], tuple[int, ...]]:
        _, grid_h, grid_w = (int(v) for v in out["image_grid_thw"][0].tolist())
        patch = int(getattr(self.model.config.vision_config, "patch_size", 14))
        return [View.full(*image.shape[1:])], (grid_h * patch, grid_w * patch)



class _Idefics3(_VisionLanguage):
    """Idefics3 / SmolVLM: the image (resized) is cut into square crops in raster order plus a
    global view of the whole image; the prompt names each crop ``<row_r_col_c>``."""

    def views(self, image: Tensor, out: dict[str, Any]) -> tuple[list[View], tuple[int, ...]]:
        height, width = (int(v) for v in image.shape[1:])
        pixel_values = out["pixel_values"][0]
        real = int((pixel_values.flatten(1) != 0).any(dim=1).sum())
        tokens = self.convert_ids_to_tokens(out["input_ids"][0].tolist())
        cells = [tuple(int(v) for v in t[5:-1].split("_col_")) for t in tokens if t.startswith("<row_") and "_col_" in t]
        rows, columns = (max(r for r, _ in cells), max(c for _, c in cells)) if cells else (0, 0)
        if rows * columns + 1 != real and not (rows == 0 and real == 1):
            raise ValueError(f"{real} crops in the pixel values for a {rows} x {columns} grid plus a global image")
        views = [View(r * height / rows, c * width / columns, (r + 1) * height / rows, (c + 1) * width / columns)
                 for r in range(rows) for c in range(columns)] if rows else []
        side = int(pixel_values.shape[-1])
        return views + [View.full(height, width)], (real, side, side)


#: Hugging Face families by ``config.model_type``.
FAMILIES: dict[str, type[Captioner]] = {
    "vision-encoder-decoder": _VisionEncoderDecoder,
    "blip": _Blip,
    "git": _Git,
    "blip-2": _Blip2,
    "instructblip": _Blip2,
    "llava": _VisionLanguage,
    "fast_vlm": _VisionLanguage,
    "llava_next": _LlavaNext,
    "paligemma": _PaliGemma,
    "qwen2_vl": _Qwen2VL,
    "idefics3": _Idefics3,
    "smolvlm": _Idefics3,
}
SUPPORTED_FAMILIES = tuple(sorted(FAMILIES))


def captioner_for(model: nn.Module, processor: Any, tokenizer: Any) -> Captioner:
    """The family of ``model`` by architecture (``config.model_type``), else the captioner protocol."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is not None:
        return family(model, processor, tokenizer)
    if model_type is not None and tokenizer is None:
        raise TypeError(
            f"{type(model).__name__} (model_type {model_type!r}) is not a captioning family multiexplain knows "
            f"(known: {', '.join(SUPPORTED_FAMILIES)}); a model that takes (images, input_ids) and returns logits "
            "(N, T, V) can be explained through the captioner protocol with tokenizer=, and any model's layer can be "
            "named with target_layer= (with reshape= for tokens)"
        )
    return ProtocolCaptioner(model, processor, tokenizer)
