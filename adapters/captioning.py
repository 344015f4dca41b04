"""Captioning: a Grad-CAM++ heat map for every word of a caption or of a vision-language model's
answer (``multiexplain.adapters.captioning``).

The caption (given, or generated greedily / with beam search) is scored by ONE teacher-forced
forward pass: the score of token ``t`` is ``log p(token_t | image, prompt, tokens < t)``. One
:class:`~multiexplain.ExplainRequest` carries a target callable ``model_output -> (N, K)`` that
returns every token's log-probability, every multi-token word's (the sum of its tokens') and the
whole caption's, so all ``K`` maps come from that one forward through batched vector-Jacobian
products (``max_batch=`` bounds how many run at once). The layer is the one resolver's ("auto");
nothing here chooses layers or computes maps. The maps are then drawn on the ORIGINAL image's
pixel grid, whatever the processor did to it (resize, crop, padding, tiles).

Model families, recognised by architecture (``config.model_type``), so subclasses work
(:mod:`multiexplain.adapters.caption_models`):

* captioners: Hugging Face ``VisionEncoderDecoderModel`` (any vision encoder, Swin included, + a
  text decoder), BLIP, GIT;
* vision-language models, with ``prompt=`` (a question or an instruction; its tokens are not
  explained): BLIP-2 and InstructBLIP (decoder-only language models), LLaVA, LLaVA-NeXT (base
  image + tiles), PaliGemma, Qwen2-VL (dynamic resolution), Idefics3 and SmolVLM (image splitting);
  they take ``processor=`` (``AutoProcessor.from_pretrained(name)``);
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

from multiexplain.core import normalize_maps
from multiexplain.explain import (ExplainRequest, Explanation, MaxBatch, PositionScores, check_max_batch, explain_request,
                                  method_names, model_logits)
from multiexplain.explain.capture import Element
from multiexplain.explain.layers import LayerSpec, Reshape

from .caption_models import SUPPORTED_FAMILIES, Captioner, Prepared, ProtocolCaptioner, as_float_images, captioner_for, place_on_image

__all__ = ["SCORES", "SUPPORTED_FAMILIES", "CaptionExplanation", "caption_scores", "explain_caption"]


@dataclass
class CaptionExplanation(Explanation):
    """Per-word explanation of one image's caption (or answer) by one method: the shared fields
    for the ``W`` words -- ``maps (W, H, W_img)`` in ``[0, 1]`` on the ORIGINAL image's pixel grid,
    ``raw (W, *grid)`` at the layer's resolution (``(W, tiles, h, w)`` for tiled inputs),
    ``weights (W, C)``, ``scores (W,)`` word log-probabilities (sums of logits with
    ``score="logit"``), ``targets`` ``None``, ``zero_gradient (W,)`` -- plus the caption's view.
    Tensors live on the model's device.

    Attributes:
        image: ``(3, H, W)`` the image the maps are drawn on (the user's image), in ``[0, 1]``.
        caption: the explained caption / answer (decoded, without special tokens).
        prompt: the prompt it answers (``None`` for plain captioning).
        words: the ``W`` explained words (sub-word tokens merged; special tokens only with
            ``include_special=True``); ``word_tokens``: for each word, its indices into ``tokens``.
        tokens, token_ids: the ``T`` scored tokens of the answer (the prompt's are not explained).
        token_maps, token_raw, token_scores: the same per token (``None`` with ``token_maps=False``).
        caption_map, caption_raw, caption_score: the whole answer's log-probability (the paper's score).
        generated: True when the model wrote the caption.
    """

    image: Tensor | None = None
    caption: str = ""
    prompt: str | None = None
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
            titles.append("whole caption" if self.prompt is None else "whole answer")
        asked = f"{self.prompt!r} -> " if self.prompt else ""
        suptitle = f'{self.method}: {asked}"{self.caption}" (log p = {float(self.caption_score):.2f})'
        return save_overlay_grid(path, self.image, heatmaps, titles, ncols=ncols, suptitle=suptitle, **kwargs)

    def save_word_overlays(self, folder: str, stem: str, **kwargs: Any) -> list[tuple[str, str]]:
        """One overlay PNG per word and one for the whole caption in ``folder``:
        ``[(label, path)]``, for the report's interactive word view."""
        from pathlib import Path

        from multiexplain.viz import save_overlay

        out = []
        labelled = list(zip(self.words, self.maps)) + [("whole caption" if self.prompt is None else "whole answer", self.caption_map)]
        for index, (label, heatmap) in enumerate(labelled):
            path = Path(folder) / f"{stem}_w{index:02d}.png"
            save_overlay(path, self.image, heatmap, **kwargs)
            out.append((label, str(path)))
        return out


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
    """What to explain for one image: token ids (context + answer), which scored tokens count, and the words."""

    ids: list[int]
    context: int  # ids[:context] are read, not explained (start token, prompt)
    scored: list[int]  # positions into ids[1:] that are explained as tokens
    words: list[tuple[str, list[int]]]  # word, indices into ``scored``
    generated: bool

    @property
    def answer_positions(self) -> list[int]:
        """Positions into ``ids[1:]`` of every answer token (the whole-answer score)."""
        return list(range(self.context - 1, len(self.ids) - 1))


def _plan(captioner: Captioner, context: list[int], answer: list[int], include_special: bool, generated: bool) -> _Plan:
    ids = list(context) + list(answer)
    predicted = ids[1:]
    scored = [t for t in range(len(context) - 1, len(predicted))
              if include_special or predicted[t] not in captioner.special_ids]
    if not scored:
        raise ValueError(
            "the caption has no words to explain"
            + (" (the model generated only special tokens; pass caption=, a prompt=, or other generation arguments "
               "such as min_new_tokens=)" if generated else "")
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
    if not words:
        raise ValueError("the caption has no words to explain (its tokens decode to whitespace only)")
    return _Plan(ids, len(context), scored, words, generated)


def _combination(
    plans: list[_Plan], length: int, device: torch.device, token_maps: bool
) -> tuple[Tensor, list[tuple[list[int] | None, list[int], int]]]:
    """Rows combining token log-probabilities into explained scores, ``(N, K, length)``: every
    scored token (if ``token_maps``), every word (a multi-token word is its tokens' sum; a
    one-token word reuses its token's row) and the whole answer (every answer token).
    Also, per image, the row of each token (``None`` without token maps), word and the answer."""
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
        rows.append(plan.answer_positions)
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
    prompt: str | Sequence[str] | None = None,
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
    max_batch: MaxBatch = "auto",
    **generate_kwargs: Any,
) -> CaptionExplanation | list[CaptionExplanation] | dict[str, Any]:
    """Per-word (and whole-caption) maps of a caption or answer over the image.

    Args:
        model: a captioner or vision-language model of a known family (with ``processor=`` and/or
            ``tokenizer=``), or any captioner of the module's protocol (with ``tokenizer=``).
        images: one image (``(3, H, W)`` tensor in ``[0, 1]`` or uint8, PIL image, ``(H, W, 3)``
            array) -> one :class:`CaptionExplanation`; a batch (``(N, 3, H, W)`` tensor or a list)
            -> a list. Without a processor, tensors are used as the model's pixel values. Maps
            come back on each image's own pixel grid.
        caption: the caption / answer to explain, one per image (a list) or one for all;
            ``None``: the model generates one (greedy by default; ``num_beams``,
            ``max_new_tokens``, ``min_new_tokens`` and other generation arguments pass through
            ``generate_kwargs``).
        prompt: a question or instruction for a vision-language model (one, or one per image),
            put in the processor's chat template unless it already holds the image token; a
            decoder prefix for a captioner. Its tokens condition the answer and are not explained.
        method / methods: one method (default ``"gradcam++"``) -> explanations; several
            (``methods=("gradcam++", "gradcam")``) -> ``{method: explanations}``, all from the same
            forward pass and gradients.
        target_layer, reshape, layer_call, element: the layer; ``"auto"`` is the one resolver's
            (each family's vision tokens where they leave for the language model, a protocol
            model's ``explain_layer``, else the probe).
        include_special: also explain special tokens (the end token) as words.
        token_maps: also compute every token's map; ``False`` computes only the words and the
            caption (fewer vector-Jacobian products when words are split into sub-words).
        score: ``"logprob"`` (log-probability of each token) or ``"logit"`` (its pre-softmax logit).
        max_batch: at most this many words' gradients in one batched backward pass; bounds memory
            for long answers on large models, and the maps do not change. ``None``: all words at
            once. ``"auto"`` (default): the family's choice (``Captioner.default_max_batch``): for a
            decoder-only vision-language model, batches sized by a word's gradient bytes and the
            device (:func:`multiexplain.explain.auto_chunk`; small on a CPU), or one word per pass
            where one such batch, timed against single passes, is slower per word; else all at once.
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {SCORES}")
    names, single_method = method_names(method, methods)
    captioner = captioner_for(model, processor, tokenizer)
    max_batch = captioner.default_max_batch if max_batch == "auto" else check_max_batch(max_batch)
    single = (isinstance(images, Tensor) and images.ndim == 3) or not isinstance(images, (Tensor, list, tuple))
    float_images = as_float_images(images)
    if not float_images:
        raise ValueError("no images given")
    n = len(float_images)
    prompts = _per_image(prompt, n, "prompts")
    captions = _per_image(caption, n, "captions")
    prepared = [captioner.prepare(image, text) for image, text in zip(float_images, prompts)]
    plans = _plans(captioner, prepared, captions, include_special, generate_kwargs)

    groups = _groups(captioner, prepared)
    results: dict[str, list[CaptionExplanation | None]] = {name: [None] * n for name in names}
    for group in groups:
        items, group_plans = [prepared[i] for i in group], [plans[i] for i in group]
        explained, layouts = _explain_group(model, captioner, items, group_plans, names, token_maps, score,
                                            (target_layer, reshape, layer_call, element), max_batch)
        for name, explanation in explained.items():
            for offset, index in enumerate(group):
                results[name][index] = _collect(captioner, prepared[index], plans[index], layouts[offset], explanation,
                                                offset, prompts[index])
    out: dict[str, Any] = {name: per_image[0] if single else list(per_image) for name, per_image in results.items()}
    return out[names[0]] if single_method else out


def _per_image(value: Any, n: int, what: str) -> list[Any]:
    if value is None or isinstance(value, str):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{len(values)} {what} for {n} images")
    return values


def _groups(captioner: Captioner, prepared: list[Prepared]) -> list[list[int]]:
    """Images explained together in one forward pass: all images of one input size for batched
    families (captioners whose inputs stack), else one image per pass."""
    if not captioner.batched:
        return [[i] for i in range(len(prepared))]
    by_shape: dict[Any, list[int]] = {}
    for i, item in enumerate(prepared):
        key = tuple((name, tuple(value.shape)) for name, value in item.inputs.items() if isinstance(value, Tensor))
        by_shape.setdefault(key, []).append(i)
    return list(by_shape.values())


def _explain_group(model: nn.Module, captioner: Captioner, items: list[Prepared], plans: list[_Plan], names: tuple[str, ...],
                   token_maps: bool, score: str, layer: tuple, max_batch: MaxBatch):
    """One teacher-forced forward and the batched VJPs for a group of images."""
    device = captioner.device
    n, length = len(items), max(len(p.ids) for p in plans)
    pad = getattr(captioner.tokenizer, "pad_token_id", None) or 0
    ids = torch.full((n, length), int(pad), dtype=torch.long, device=device)
    mask = torch.zeros((n, length), dtype=torch.long, device=device)
    for i, plan in enumerate(plans):
        ids[i, : len(plan.ids)] = torch.tensor(plan.ids, device=device)
        mask[i, : len(plan.ids)] = 1
    matrix, layouts = _combination(plans, length - 1, device, token_maps)

    def position_scores(output: Any) -> tuple[Tensor, Tensor]:
        """Every logit position's token score ``(N, P)`` and the K explained scores' weights on
        them ``(N, K, P)``, from the ONE teacher-forced forward."""
        logits = model_logits(output)
        if logits.ndim != 3 or logits.shape[0] != n:
            raise ValueError(f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for {n} image(s) and "
                             f"{length - 1} input tokens; a captioner returns (N, T, vocabulary) teacher-forced logits")
        # Logits for the last `kept` input positions: models that prepend image tokens return more
        # (GIT), models asked for the answer's positions only (logits_to_keep) fewer.
        positions = int(logits.shape[1])
        kept = min(positions, length - 1)
        token_scores = caption_scores(logits[:, -kept:], ids[:, length - 1 - kept :], mask[:, length - 1 - kept :], score)
        before = (positions - kept, 0)
        return torch.nn.functional.pad(token_scores, before), torch.nn.functional.pad(matrix[..., -kept:], before)

    target_layer, reshape, layer_call, element = layer
    # Maps at the processor's input size serve only images it left as they were; the others'
    # maps are drawn from the raw ones onto the original image (_collect), so none are made here.
    # The token head is crossed once for all K scores when the family names it (PositionScores).
    head = captioner.output_head
    explained_scores = PositionScores(head, position_scores) if head is not None else (
        lambda output: PositionScores.combine(*position_scores(output)))
    request = ExplainRequest(captioner.forward_inputs(items, ids, mask), explained_scores, target_layer, reshape, layer_call,
                             element, input_size=items[0].input_size, max_batch=max_batch, batch_size=n,
                             upsample=all(item.identity for item in items))
    try:
        explained = explain_request(model, request, names)
    except TypeError as error:
        if not isinstance(captioner, ProtocolCaptioner):
            raise
        raise TypeError(f"{type(model).__name__} does not follow the captioner protocol "
                        f"model(images, input_ids) -> logits (N, T, V): {error}") from error
    return explained, layouts


def _plans(captioner: Captioner, prepared: list[Prepared], captions: list[Any], include_special: bool,
           generate_kwargs: dict) -> list[_Plan]:
    """What to explain per image: the given captions, or the ones the model generates."""
    if all(text is None for text in captions):
        modes = {module: module.training for module in captioner.model.modules()}
        try:
            with torch.no_grad():
                answers = [captioner.generate(item, **generate_kwargs) for item in prepared]
        finally:  # generate() may switch modes; every submodule's flag is put back
            for module, mode in modes.items():
                module.training = mode
        return [_plan(captioner, item.context, answer, include_special, True) for item, answer in zip(prepared, answers)]
    if generate_kwargs:
        raise TypeError(f"generation arguments {sorted(generate_kwargs)} given with a caption to explain")
    if any(text is None for text in captions):
        raise ValueError("give a caption for every image, or caption=None to generate them all")
    return [_plan(captioner, item.context, captioner.answer_ids(text), include_special, False)
            for item, text in zip(prepared, captions)]


def _collect(captioner: Captioner, prepared: Prepared, plan: _Plan, layout: tuple[list[int] | None, list[int], int],
             explanation: Explanation, i: int, prompt: str | None) -> CaptionExplanation:
    """One image's :class:`CaptionExplanation` from the group's ``(N, K, ...)`` explanation, its
    maps drawn on the original image (the processor's geometry undone)."""
    token_rows, word_rows, caption_row = layout
    raw, weights, scores, zero = explanation.raw[i], explanation.weights[i], explanation.scores[i], explanation.zero_gradient[i]
    if prepared.identity and tuple(explanation.maps.shape[-2:]) == prepared.size:
        maps = explanation.maps[i]
    else:
        maps = normalize_maps(place_on_image(raw, prepared.views, prepared.size), 2)
    predicted = plan.ids[1:]
    token_ids = [predicted[t] for t in plan.scored]
    tokens = token_rows is not None
    return CaptionExplanation(
        maps=maps[word_rows], raw=raw[word_rows], weights=weights[word_rows], scores=scores[word_rows], targets=None,
        zero_gradient=zero[word_rows], method=explanation.method, layer=explanation.layer,
        image=prepared.image.to(maps.device), caption=captioner.decode(plan.ids[plan.context:]), prompt=prompt,
        words=[word for word, _ in plan.words], word_tokens=[members for _, members in plan.words],
        tokens=captioner.convert_ids_to_tokens(token_ids), token_ids=torch.tensor(token_ids, device=scores.device),
        token_maps=maps[token_rows] if tokens else None, token_raw=raw[token_rows] if tokens else None,
        token_scores=scores[token_rows] if tokens else None,
        caption_map=maps[caption_row], caption_raw=raw[caption_row], caption_score=scores[caption_row],
        generated=plan.generated,
    )
