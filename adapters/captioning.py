"""Captioning adapter: a Grad-CAM++ heat map for every word of a caption.

Public entry points (stable; the CLI calls these):

* :func:`explain_caption` ``(model, images, caption=None, *, processor=None, tokenizer=None,
  method="gradcam++", compare_with="gradcam", target_layer=None, reshape=None, layer_call=None,
  include_special=False, token_maps=True, score="logprob", **generate_kwargs)`` (generation
  arguments such as ``num_beams`` and ``max_new_tokens`` apply when ``caption`` is None) -> :class:`CaptionExplanation` for one
  image (``(3, H, W)`` tensor, PIL image or array), or a list of them for a batch
  (``(N, 3, H, W)`` tensor or a list of images).
* :class:`CaptionExplanation`: ``.words``, ``.maps`` ``(W, H, W)`` in ``[0, 1]``, ``.raw``
  ``(W, h, w)``, ``.scores`` ``(W,)`` word log-probabilities, ``.token_maps`` ``(T, H, W)``,
  ``.caption_map`` ``(H, W)`` (score = the whole caption's log-probability, as in the paper),
  ``.for_method("gradcam")`` for the comparison maps, ``.save_figure(path)``.
* :func:`load_show_and_tell` -> ``(model, vocabulary)``: the shipped Show-Attend-Tell captioner.
* :func:`make_captioned_scenes` ``(n, seed)``: the seeded synthetic scenes it was trained on
  (re-exported from :mod:`multiexplain.captioned_scenes`).

How it works: the caption (given, or generated greedily / with beam search) is scored by ONE
teacher-forced forward pass; the score of token ``t`` is ``log p(token_t | image, tokens < t)``.
The explainer receives a target callable ``model_output -> (N, K)`` returning every token's
log-probability, every multi-token word's (the sum of its tokens') and the whole caption's, so
all ``K`` maps come from that one forward through the core's batched vector-Jacobian products.
Channel weights and maps are computed by :class:`multiexplain.GradCAMPlusPlus` /
:class:`multiexplain.GradCAM`; nothing here re-implements CAM math.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "CaptionVocabulary",
    "CellNorm",
    "ShowAttendTell",
    "load_show_and_tell",
]


# ---------------------------------------------------------------------------------------------
# The Show-Attend-Tell captioner of the paper's model family (CNN encoder + LSTM decoder)
# ---------------------------------------------------------------------------------------------


class CaptionVocabulary:
    """A word-level vocabulary with the special tokens ``<pad>`` (0), ``<bos>`` (1), ``<eos>`` (2)
    and ``<unk>`` (3); words are split on whitespace and lower-cased."""

    PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"

    def __init__(self, words: Sequence[str]):
        specials = [self.PAD, self.BOS, self.EOS, self.UNK]
        self.itos: list[str] = specials + [w for w in words if w not in specials]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def special_ids(self) -> set[int]:
        return {self.pad_token_id, self.bos_token_id, self.eos_token_id}

    def encode(self, caption: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``caption`` (``<bos> words <eos>`` by default); unknown words map to ``<unk>``."""
        ids = [self.stoi.get(word, self.unk_token_id) for word in caption.lower().split()]
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.itos[int(i)] if 0 <= int(i) < len(self.itos) else self.UNK for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        words = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id == self.eos_token_id and skip_special_tokens:
                break
            if skip_special_tokens and token_id in self.special_ids:
                continue
            words.append(self.itos[token_id] if 0 <= token_id < len(self.itos) else self.UNK)
        return " ".join(words)

    def batch_encode(self, captions: Sequence[str]) -> Tensor:
        """``(N, T)`` long tensor of ``<bos> words <eos>``, right-padded with ``<pad>``."""
        encoded = [self.encode(c) for c in captions]
        length = max(len(e) for e in encoded)
        return torch.tensor([e + [self.pad_token_id] * (length - len(e)) for e in encoded], dtype=torch.long)


class CellNorm(nn.Module):
    """Scale every cell's feature vector to the same length: ``(N, C, *spatial)`` -> same shape.

    Each cell's channel vector gets L2 norm ``sqrt(C)`` (a typical entry ~1, the scale the decoder's
    layers start from). An all-zero cell stays zero.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=1, keepdim=True).clamp(min=1e-6) * x.shape[1] ** 0.5


class ShowAttendTell(nn.Module):
    """CNN encoder with a spatial feature map + LSTM decoder with spatial attention over it.

    ``encoder`` maps images ``(N, 3, 64, 64)`` to features ``(N, C, 16, 16)`` (the layer the
    adapter explains by default). The decoder is the "attend with the current state" variant
    of Show-Attend-Tell (Xu et al. 2015; Lu et al. 2017): the LSTM reads the words so far, its
    state queries the 256 grid cells with soft (softmax) attention, and the word's logits are
    a function of the state plus a linear read-out of the attended context and of two scalars:
    the attention's evidence (log-sum-exp of the energies: is there anything left to describe?)
    and the mass of cells that look like the context (how many objects: "two green
    triangles"). The image reaches word ``t`` only through step ``t``'s attention, and linearly
    in the context, which is what makes per-word maps meaningful.
    ``receptive_field`` (pixels seen by one feature cell: 13, 17 or 25; the older ``last_kernel``
    3 / 1 means 25 / 17) decides WHERE the attention can read an object: with 25 px a background
    cell beside an object sees all of it, and the attention learnt to sit on such cells (the named
    object got the attention's peak for 1-4% of words); with a field no larger than an object only
    the object's own cells tell what it is, so the attention sits on them.
    ``normalize_cells`` ends the encoder with :class:`CellNorm` (every cell's features scaled to
    the same length), which makes maps rank cells by what they show rather than how strongly they fire.
    ``forward(images, input_ids)`` is the teacher-forced pass: logits ``(N, T, V)``, position
    ``t`` predicting token ``t + 1``.
    """

    def __init__(
        self,
        vocab_size: int,
        image_size: int = 64,
        feature_channels: int = 64,
        embed_dim: int = 32,
        hidden_dim: int = 128,
        attention_dim: int = 64,
        last_kernel: int | None = None,
        receptive_field: int = 25,
        normalize_cells: bool = False,
    ) -> None:
        super().__init__()
        if last_kernel is not None:  # the older spelling: kernel 3 -> 25 px, kernel 1 -> 17 px
            receptive_field = {3: 25, 1: 17}.get(last_kernel, 0)
        if receptive_field not in (13, 17, 25):
            raise ValueError(f"receptive_field must be 13, 17 or 25 (pixels), got {receptive_field} (last_kernel={last_kernel})")
        self.config = dict(
            vocab_size=vocab_size, image_size=image_size, feature_channels=feature_channels,
            embed_dim=embed_dim, hidden_dim=hidden_dim, attention_dim=attention_dim, receptive_field=receptive_field,
            normalize_cells=normalize_cells,
        )
        self.image_size = image_size
        if receptive_field == 13:
            # A 13 px receptive field is smaller than an object (13-19 px across): a cell on an
            # object sees most of it, a background cell beside it only a sliver of its edge, so
            # the cells that can tell what an object is are the object's own cells; the decoder
            # has to attend to them, and the word's evidence (and its Grad-CAM map) sits there.
            self.encoder = nn.Sequential(
                nn.Conv2d(3, 24, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(),
                nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(48, feature_channels, 1), nn.ReLU(),
            )
        else:
            kernel = 3 if receptive_field == 25 else 1
            self.encoder = nn.Sequential(
                nn.Conv2d(3, 24, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(),
                nn.Conv2d(48, feature_channels, kernel, padding=kernel // 2), nn.ReLU(),
            )
        if normalize_cells:
            # Grad-CAM++'s map is (channel weights) . (each cell's features), so a cell elsewhere
            # that fires hard on the weighted channels can out-score the cells the word was read
            # from. With equal-length cell vectors the map ranks cells by WHAT they show (the
            # direction), not by how strongly they fire: on validation scenes the shipped model's
            # shape-word pointing went from 72% to 79% (0 px) and from 81% to 91% (2 px).
            self.encoder.append(CellNorm())
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTMCell(embed_dim, hidden_dim)
        self.attend_features = nn.Linear(feature_channels, attention_dim)
        self.attend_hidden = nn.Linear(hidden_dim, attention_dim)
        self.attention_score = nn.Linear(attention_dim, 1)
        # Which cells look like the attended context (their count says how many objects).
        self.match = nn.Linear(feature_channels, 1)
        nn.init.constant_(self.match.bias, -3.0)
        # The word logits are a function of the words so far plus a LINEAR read-out of the
        # attended context (and of the two scalars). The image evidence for word w is then
        # ``read_context.weight[w] . context``, a detector of w applied to the attended cells.
        self.read_state = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, vocab_size))
        self.read_context = nn.Linear(feature_channels, vocab_size, bias=False)
        self.read_scalars = nn.Linear(2, vocab_size, bias=False)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1), persistent=False)

    # A typical object covers about 16 of the 256 cells.
    CELLS_PER_OBJECT = 16.0

    def normalize(self, images: Tensor) -> Tensor:
        """Images in ``[0, 1]`` ``(N, 3, H, W)`` -> the network's input scale."""
        return (images - self.mean) / self.std

    def _start(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Flatten the grid and set up the decoder: cells ``(N, P, C)``, their attention
        projection ``(N, P, A)`` and a zero LSTM state (the LSTM reads words only)."""
        cells = features.flatten(2).transpose(1, 2)
        h = cells.new_zeros(cells.shape[0], self.lstm.hidden_size)
        return cells, self.attend_features(cells), h, torch.zeros_like(h)

    def _step(self, tokens: Tensor, cells: Tensor, projected: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One decoder step: ``(logits (N, V), attention (N, P), h, c)``."""
        h, c = self.lstm(self.embed(tokens), (h, c))
        energy = self.attention_score(torch.tanh(projected + self.attend_hidden(h).unsqueeze(1))).squeeze(2)
        attention = energy.softmax(dim=1)
        context = (attention.unsqueeze(2) * cells).sum(dim=1)
        evidence = torch.logsumexp(energy, dim=1, keepdim=True) - math.log(energy.shape[1])
        matching = torch.sigmoid(self.match(cells * context.unsqueeze(1))).squeeze(2)
        mass = matching.sum(dim=1, keepdim=True) / self.CELLS_PER_OBJECT
        logits = self.read_state(h) + self.read_context(context) + self.read_scalars(torch.cat([evidence, mass], dim=1))
        return logits, attention, h, c

    def forward(self, images: Tensor, input_ids: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher-forced logits ``(N, T, V)`` (and attention ``(N, T, P)`` if asked)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(images.shape)}")
        if tuple(images.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"this Show-Attend-Tell model takes {self.image_size}x{self.image_size} images, got "
                f"{images.shape[2]}x{images.shape[3]}"
            )
        features = self.encoder(self.normalize(images))
        cells, projected, h, c = self._start(features)
        logits, attentions = [], []
        for t in range(input_ids.shape[1]):
            step_logits, attention, h, c = self._step(input_ids[:, t], cells, projected, h, c)
            logits.append(step_logits)
            attentions.append(attention)
        logits_t = torch.stack(logits, dim=1)
        return (logits_t, torch.stack(attentions, dim=1)) if return_attention else logits_t

    @torch.no_grad()
    def generate(self, images: Tensor, max_length: int = 20, num_beams: int = 1, bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 0) -> Tensor:
        """Greedy (``num_beams=1``) or beam-search captions: ``(N, L)`` ids starting with
        ``<bos>``, ending with ``<eos>`` (or cut at ``max_length`` new tokens), right-padded."""
        features = self.encoder(self.normalize(images))
        results = []
        for i in range(images.shape[0]):
            cells, projected, h, c = self._start(features[i : i + 1])
            beams = [([bos_token_id], 0.0, h, c)]
            finished: list[tuple[list[int], float]] = []
            for _ in range(max_length):
                candidates = []
                for tokens, score, h, c in beams:
                    logits, _, h2, c2 = self._step(torch.tensor([tokens[-1]], device=images.device), cells, projected, h, c)
                    logp = logits.log_softmax(dim=1)[0]
                    top = logp.topk(num_beams)
                    for value, index in zip(top.values.tolist(), top.indices.tolist()):
                        candidates.append((tokens + [index], score + value, h2, c2))
                candidates.sort(key=lambda item: item[1], reverse=True)
                beams = []
                for tokens, score, h, c in candidates:
                    if tokens[-1] == eos_token_id:
                        finished.append((tokens, score))
                    else:
                        beams.append((tokens, score, h, c))
                    if len(beams) == num_beams:
                        break
                if len(finished) >= num_beams or not beams:
                    break
            finished += [(tokens, score) for tokens, score, _, _ in beams]
            # Length-normalised like Hugging Face's default (length_penalty=1).
            best = max(finished, key=lambda item: item[1] / max(len(item[0]) - 1, 1))[0]
            results.append(best)
        length = max(len(r) for r in results)
        return torch.tensor([r + [pad_token_id] * (length - len(r)) for r in results], dtype=torch.long, device=images.device)


_CHECKPOINT = "show_and_tell.pt"


def _checkpoint_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "multiexplain", "checkpoints", _CHECKPOINT)


def load_show_and_tell(path: str | None = None, device: str | torch.device = "cpu") -> tuple[ShowAttendTell, CaptionVocabulary]:
    """The shipped Show-Attend-Tell captioner (trained by ``scripts/train_show_and_tell.py`` on
    :func:`make_captioned_scenes`) in eval mode, and its vocabulary."""
    if path is None:
        try:
            from importlib.resources import files

            resource = files("multiexplain").joinpath("checkpoints", _CHECKPOINT)
            path = str(resource) if resource.is_file() else _checkpoint_path()
        except (ModuleNotFoundError, TypeError):
            path = _checkpoint_path()
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    vocabulary = CaptionVocabulary(checkpoint["vocabulary"])
    model = ShowAttendTell(**checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), vocabulary


# ---------------------------------------------------------------------------------------------
# Explaining captions
# ---------------------------------------------------------------------------------------------

from multiexplain.cam import METHODS, BaseCAM, Explanation  # noqa: E402
from multiexplain.captioned_scenes import make_captioned_scenes  # noqa: E402  (re-exported)
from multiexplain.layers import TokenReshape  # noqa: E402

__all__ += ["CaptionMaps", "CaptionExplanation", "explain_caption", "make_captioned_scenes", "caption_scores"]


@dataclass
class CaptionMaps:
    """The maps of one method for one image.

    Attributes:
        method: ``"gradcam++"`` or ``"gradcam"``.
        maps: ``(W, H, W_img)`` per-word maps at the image's resolution, each min-max normalised to ``[0, 1]``.
        raw: ``(W, h, w)`` per-word maps at the layer's resolution, before normalisation.
        token_maps / token_raw: the same per scored token, ``(T, H, W_img)`` / ``(T, h, w)``
            (``None`` with ``token_maps=False``).
        caption_map / caption_raw: ``(H, W_img)`` / ``(h, w)`` for the whole caption's log-probability.
    """

    method: str
    maps: Tensor
    raw: Tensor
    token_maps: Tensor | None
    token_raw: Tensor | None
    caption_map: Tensor
    caption_raw: Tensor


@dataclass
class CaptionExplanation:
    """Per-word explanation of one image's caption. All tensors live on the model's device.

    Attributes:
        image: ``(3, H, W)`` the image as the model saw it (after the processor), in ``[0, 1]``.
        caption: the explained caption (decoded, without special tokens).
        words: the ``W`` explained words (sub-word tokens merged; special tokens only with
            ``include_special=True``).
        word_tokens: for each word, the indices into ``tokens`` it is made of.
        tokens: the ``T`` scored tokens (every token after the start token, as the tokenizer spells them).
        token_ids: ``(T,)`` their ids.
        scores: ``(W,)`` word log-probabilities (sum of the word's token log-probabilities; sums of
            logits with ``score="logit"``).
        token_scores: ``(T,)`` token log-probabilities ``log p(token_t | image, tokens < t)``
            (``None`` with ``token_maps=False``).
        caption_score: ``()`` the whole caption's log-probability (every scored token, end token included).
        layer: dotted name of the explained layer.
        results: maps per method; the first is the primary ``method``.
        generated: True when the model wrote the caption.
    """

    image: Tensor
    caption: str
    words: list[str]
    word_tokens: list[list[int]]
    tokens: list[str]
    token_ids: Tensor
    scores: Tensor
    token_scores: Tensor | None
    caption_score: Tensor
    layer: str
    results: dict[str, CaptionMaps]
    generated: bool = False

    @property
    def method(self) -> str:
        return next(iter(self.results))

    def for_method(self, method: str) -> CaptionMaps:
        """The maps of ``method`` (``"gradcam++"`` or ``"gradcam"``)."""
        if method not in self.results:
            raise KeyError(f"no {method!r} maps in this explanation; computed: {list(self.results)}")
        return self.results[method]

    @property
    def maps(self) -> Tensor:
        """``(W, H, W_img)`` per-word maps of the primary method, in ``[0, 1]``."""
        return self.results[self.method].maps

    @property
    def raw(self) -> Tensor:
        return self.results[self.method].raw

    @property
    def token_maps(self) -> Tensor | None:
        return self.results[self.method].token_maps

    @property
    def caption_map(self) -> Tensor:
        return self.results[self.method].caption_map

    def save_figure(self, path: str, method: str | None = None, *, caption_panel: bool = True, ncols: int = 5, **kwargs: Any) -> str:
        """PNG grid: the image, then one overlay per word (the word as title), then the
        whole-caption map. Long captions wrap onto more rows. Returns the path written."""
        from multiexplain.viz import save_overlay_grid

        result = self.for_method(method or self.method)
        heatmaps = list(result.maps)
        titles = list(self.words)
        if caption_panel:
            heatmaps.append(result.caption_map)
            titles.append("whole caption")
        suptitle = f'{result.method}: "{self.caption}" (log p = {float(self.caption_score):.2f})'
        return save_overlay_grid(path, self.image, heatmaps, titles, ncols=ncols, suptitle=suptitle, **kwargs)


# -- one class per model family: images -> pixel values, captions <-> ids, teacher-forced inputs ---


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _as_float_images(images: Any) -> list[Tensor]:
    """Images as a list of ``(3, H, W)`` float tensors in ``[0, 1]`` (tensors, PIL images, arrays, file paths)."""
    import numpy as np

    if isinstance(images, Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        if batch.ndim != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(f"expected images (3, H, W) or (N, 3, H, W), got shape {tuple(images.shape)}")
        batch = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
        return [image.expand(3, -1, -1) for image in batch]
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _as_float_images(item)]
    if isinstance(images, (str, os.PathLike)):
        from PIL import Image

        if not os.path.isfile(images):
            raise FileNotFoundError(f"no image file {str(images)!r}")
        with Image.open(images) as opened:
            images = opened.convert("RGB")
    array = np.asarray(images.convert("RGB") if hasattr(images, "convert") else images)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3:
        raise ValueError(f"expected an image (H, W[, 3]), got an array of shape {array.shape}")
    tensor = torch.from_numpy(np.array(array[..., :3])).permute(2, 0, 1)  # a writable copy
    return [tensor.float() / 255 if tensor.dtype == torch.uint8 else tensor.float()]


class _Captioner:
    """What the adapter needs from a captioning model family."""

    default_layer: str = ""
    default_layer_call: int | None = None
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

    def reshape(self) -> Any:
        return None

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
            text = self.tokenizer.decode([int(i) for i in ids[: position + 1]], clean_up_tokenization_spaces=False)
            if spans and text.startswith(previous) and len(text) > len(previous) and not text[len(previous)].isspace():
                word, members = spans[-1]
                spans[-1] = (word + text[len(previous):], members + [position])
            else:
                piece = text[len(previous):] if text.startswith(previous) else self.tokenizer.decode([int(ids[position])])
                spans.append((piece.strip(), [position]))
            previous = text
        return spans

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


class _ShowAttendTellCaptioner(_Captioner):
    default_layer = "encoder"

    def __init__(self, model: ShowAttendTell, processor: Any, tokenizer: Any):
        if tokenizer is None or not isinstance(tokenizer, CaptionVocabulary):
            raise TypeError("a ShowAttendTell model needs its CaptionVocabulary as tokenizer= (load_show_and_tell() returns it)")
        super().__init__(model, processor, tokenizer)
        self.start_id, self.end_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.special_ids = tokenizer.special_ids

    def pixel_values(self, images: list[Tensor]) -> tuple[Tensor, Tensor]:
        size = self.model.image_size
        for image in images:
            if tuple(image.shape[1:]) != (size, size):
                raise ValueError(f"this Show-Attend-Tell model takes {size}x{size} images, got {image.shape[1]}x{image.shape[2]}")
        batch = torch.stack(images).to(self.device, _floating_dtype(self.model))
        return batch, batch.float().clamp(0, 1)

    def content_ids(self, caption: str) -> list[int]:
        return self.tokenizer.encode(caption, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def word_spans(self, ids: list[int]) -> list[tuple[str, list[int]]]:
        return [(token, [i]) for i, token in enumerate(self.tokenizer.convert_ids_to_tokens(ids))]

    def generate(self, pixel_values: Tensor, num_beams: int = 1, max_new_tokens: int | None = None, max_length: int | None = None, **kwargs: Any) -> list[list[int]]:
        if kwargs:
            raise TypeError(f"ShowAttendTell.generate takes num_beams and max_new_tokens, not {sorted(kwargs)}")
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

    @property
    def grid(self) -> tuple[int, int]:
        patch = self.vision_config.patch_size
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return (self.image_size[0] // patch[0], self.image_size[1] // patch[1])

    def reshape(self) -> Any:
        return _PatchTokens(self.grid)

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
        self.default_layer = "encoder.layernorm" if hasattr(model.encoder, "layernorm") else ""

    def forward_inputs(self, pixel_values: Tensor, ids: Tensor, mask: Tensor) -> Any:
        return {"pixel_values": pixel_values, "decoder_input_ids": ids[:, :-1], "decoder_attention_mask": mask[:, :-1]}


class _BlipCaptioner(_HuggingFaceCaptioner):
    default_layer = "vision_model.post_layernorm"
    # BlipVisionModel runs post_layernorm twice: on all tokens (the last hidden states, call 0)
    # and again on the pooled CLS token (call 1).
    default_layer_call = 0

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


@dataclass(frozen=True)
class _PatchTokens:
    """ViT tokens ``(N, L, D)`` -> ``(N, D, *grid)``, dropping the ``L - prod(grid)`` leading
    (CLS) tokens; channels-first outputs pass through."""

    grid: tuple[int, int]

    def __call__(self, output: Tensor) -> Tensor:
        if output.ndim == 4:
            return output
        if output.ndim != 3:
            raise ValueError(f"expected vision tokens (N, L, D), got shape {tuple(output.shape)}")
        prefix = output.shape[1] - math.prod(self.grid)
        if prefix < 0:
            raise ValueError(f"{output.shape[1]} tokens cannot fill the patch grid {self.grid}; pass reshape=")
        return TokenReshape(self.grid, prefix)(output)


def _captioner(model: nn.Module, processor: Any, tokenizer: Any) -> _Captioner:
    if isinstance(model, ShowAttendTell):
        return _ShowAttendTellCaptioner(model, processor, tokenizer)
    name = type(model).__name__
    if name == "VisionEncoderDecoderModel":
        return _VisionEncoderDecoderCaptioner(model, processor, tokenizer)
    if name == "BlipForConditionalGeneration":
        return _BlipCaptioner(model, processor, tokenizer)
    raise TypeError(
        f"unsupported captioning model {name}; supported: ShowAttendTell (load_show_and_tell), "
        "transformers VisionEncoderDecoderModel and BlipForConditionalGeneration"
    )


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
    method: str = "gradcam++",
    compare_with: str | None = "gradcam",
    target_layer: nn.Module | str | None = None,
    reshape: Any = None,
    layer_call: int | None = None,
    include_special: bool = False,
    token_maps: bool = True,
    score: str = "logprob",
    **generate_kwargs: Any,
) -> CaptionExplanation | list[CaptionExplanation]:
    """Per-word (and whole-caption) Grad-CAM++ maps of a caption over the image.

    Args:
        model: a :class:`ShowAttendTell` (with ``tokenizer=`` its vocabulary), a Hugging Face
            ``VisionEncoderDecoderModel`` or ``BlipForConditionalGeneration``.
        images: one image (``(3, H, W)`` tensor in ``[0, 1]`` or uint8, PIL image, ``(H, W, 3)``
            array, file path) -> one :class:`CaptionExplanation`; a batch (``(N, 3, H, W)`` tensor or a list)
            -> a list. Without a processor, tensors are used as the model's pixel values.
        caption: the caption to explain, one per image (a list) or one for all; ``None``: the
            model generates one (greedy by default; ``num_beams``, ``max_new_tokens`` and other
            generation arguments pass through ``generate_kwargs``).
        processor / tokenizer: the model's image processor / processor and tokenizer.
        method: primary method, ``"gradcam++"`` or ``"gradcam"``; ``compare_with`` adds a second
            method's maps (from the same forward pass and gradients), ``None`` for none.
        target_layer: the layer to explain; default the vision encoder's last hidden states
            (``encoder`` of ShowAttendTell, ``encoder.layernorm`` of a ViT encoder,
            ``vision_model.post_layernorm`` of BLIP), reshaped to the patch grid without CLS.
        reshape: rule turning the layer's output into ``(N, C, h, w)`` (default: ViT tokens to the grid).
        layer_call: which call to explain when the layer runs several times per forward
            (default: the first for BLIP's ``post_layernorm``).
        include_special: also explain special tokens (the end token) as words.
        token_maps: also return every token's map (``.token_maps``); ``False`` computes only
            the words and the caption (fewer vector-Jacobian products when words are split
            into sub-words) and leaves ``.token_maps`` ``None``.
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {SCORES}")
    methods = [method] + ([compare_with] if compare_with and compare_with != method else [])
    for name in methods:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    captioner = _captioner(model, processor, tokenizer)
    single = (isinstance(images, Tensor) and images.ndim == 3) or not isinstance(images, (Tensor, list, tuple))
    float_images = _as_float_images(images)
    if not float_images:
        raise ValueError("no images given")
    pixel_values, display = captioner.pixel_values(float_images)
    n = pixel_values.shape[0]

    if caption is None:
        was_training = model.training
        with torch.no_grad():
            sequences = captioner.generate(pixel_values, **generate_kwargs)
        model.train(was_training)
        plans = [_plan(captioner, ids, include_special, True) for ids in sequences]
    else:
        if generate_kwargs:
            raise TypeError(f"generation arguments {sorted(generate_kwargs)} given with a caption to explain")
        captions = [caption] * n if isinstance(caption, str) else list(caption)
        if len(captions) != n:
            raise ValueError(f"{len(captions)} captions for {n} images")
        plans = [_plan(captioner, captioner.ids_for(text), include_special, False) for text in captions]

    length = max(len(p.ids) for p in plans)
    pad = getattr(captioner.tokenizer, "pad_token_id", None) or 0
    ids = torch.full((n, length), int(pad), dtype=torch.long, device=captioner.device)
    mask = torch.zeros((n, length), dtype=torch.long, device=captioner.device)
    for i, plan in enumerate(plans):
        ids[i, : len(plan.ids)] = torch.tensor(plan.ids, device=captioner.device)
        mask[i, : len(plan.ids)] = 1
    matrix, layouts = _combination(plans, length - 1, captioner.device, token_maps)
    inputs = captioner.forward_inputs(pixel_values, ids, mask)

    def explained_scores(output: Any) -> Tensor:
        """All K explained scores ``(N, K)`` from the ONE teacher-forced forward."""
        logits = output[0] if isinstance(output, tuple) else output["logits"] if not isinstance(output, Tensor) else output
        token_log_probs = caption_scores(logits, ids, mask, score)
        return torch.einsum("nkt,nt->nk", matrix.to(token_log_probs.dtype), token_log_probs)

    layer = target_layer if target_layer is not None else captioner.default_layer
    if not layer:
        raise ValueError(f"no default layer for this {type(model).__name__}'s encoder; pass target_layer= (and reshape=)")
    rule = reshape if reshape is not None else captioner.reshape()
    if layer_call is None and target_layer is None:
        layer_call = captioner.default_layer_call
    explainer: BaseCAM = METHODS[method](model, layer, reshape=rule, layer_call=layer_call)
    # Grad-CAM++ and the comparison method share the forward pass and the gradients.
    explanations = explainer.explain_methods(inputs, explained_scores, methods=methods, input_size=tuple(pixel_values.shape[2:]))
    return _collect(captioner, plans, layouts, explanations, display, single)


def _collect(
    captioner: _Captioner,
    plans: list[_Plan],
    layouts: list[tuple[list[int] | None, list[int], int]],
    explanations: dict[str, Explanation],
    display: Tensor,
    single: bool,
) -> CaptionExplanation | list[CaptionExplanation]:
    first = next(iter(explanations.values()))
    results = []
    for i, (plan, (token_rows, word_rows, caption_row)) in enumerate(zip(plans, layouts)):
        per_method = {}
        for name, explanation in explanations.items():
            maps, raw = explanation.maps[i], explanation.raw[i]
            per_method[name] = CaptionMaps(
                name, maps[word_rows], raw[word_rows],
                maps[token_rows] if token_rows is not None else None, raw[token_rows] if token_rows is not None else None,
                maps[caption_row], raw[caption_row],
            )
        scores = first.scores[i]

        predicted = plan.ids[1:]
        token_ids = [predicted[t] for t in plan.scored]
        results.append(
            CaptionExplanation(
                image=display[i],
                caption=captioner.decode(plan.ids),
                words=[word for word, _ in plan.words],
                word_tokens=[members for _, members in plan.words],
                tokens=captioner.convert_ids_to_tokens(token_ids),
                token_ids=torch.tensor(token_ids, device=scores.device),
                scores=scores[word_rows],
                token_scores=scores[token_rows] if token_rows is not None else None,
                caption_score=scores[caption_row],
                layer=first.layer,
                results=per_method,
                generated=plan.generated,
            )
        )
    return results[0] if single else results
