"""The shipped captioner: Show-Attend-Tell (CNN encoder + LSTM decoder with spatial attention)
and its word-level vocabulary (trained by ``scripts/train_show_and_tell.py``).

It follows the small captioner protocol of :mod:`multiexplain.adapters.captioning`:
``model(images, input_ids) -> logits (N, T, V)``, ``model.generate(images, ...) -> ids``, and a
tokenizer (:class:`CaptionVocabulary`) with ``encode`` / ``decode``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["CaptionVocabulary", "CellNorm", "ShowAttendTell"]


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
    #: The layer "auto" resolves to: the encoder's feature grid, which the attention reads.
    explain_layer = "encoder"

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


