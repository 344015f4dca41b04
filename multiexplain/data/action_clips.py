"""Seeded synthetic action clips with exact space-time ground truth.

One *actor* shape performs one of :data:`ACTIONS` during a window of the clip and stands still
outside it, among two static distractor shapes and one distractor that drifts diagonally through
the whole clip (so "something moves" is never enough to find the actor). Everything is drawn
with :mod:`multiexplain.synthetic`, so the actor's per-frame mask is exactly the set of pixels
painted with it (the actor is painted last, on top).

Ground truth per clip:
    masks  ``(T, H, W)`` bool: the actor's pixels in every frame (empty in the frames where a
           blinking actor is off);
    active ``(T,)`` bool: the frames in which the actor performs its action (8 to 12 of 16
           frames, never the whole clip), for temporal localisation.

Clip ``i`` of ``make_action_clips(n, seed)`` depends only on ``(seed, i)``: a larger ``n`` extends
a smaller one, so train/test splits are disjoint seeds and reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .synthetic import COLOURS, SHAPES, generator, paint, shape_mask, textured_background

__all__ = ["ACTIONS", "ActionClips", "make_action_clips", "draw_action_clip"]

ACTIONS: tuple[str, ...] = (
    "move_left",
    "move_right",
    "move_up",
    "move_down",
    "grow",
    "shrink",
    "rotate",
    "blink",
)

# Shapes whose rotation is visible (a circle or ring looks the same at every angle).
_ROTATABLE = ("square", "triangle", "cross", "diamond")


@dataclass
class ActionClips:
    """A batch of synthetic clips.

    Attributes:
        clips: ``(N, 3, T, H, W)`` float32 in ``[0, 1]`` (channels first, then time).
        masks: ``(N, T, H, W)`` bool, the actor's pixels per frame.
        active: ``(N, T)`` bool, frames in which the action happens.
        labels: ``(N,)`` int64 indices into :data:`ACTIONS`.
        actor_shapes: the actor's shape name per clip.
    """

    clips: Tensor
    masks: Tensor
    active: Tensor
    labels: Tensor
    actor_shapes: list[str]

    @property
    def class_names(self) -> tuple[str, ...]:
        return ACTIONS

    def __len__(self) -> int:
        return self.clips.shape[0]


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand(1, generator=gen).item()


def _choice(gen: torch.Generator, options) -> object:
    return options[int(torch.randint(len(options), (1,), generator=gen).item())]


def draw_action_clip(
    seed: int, label: int | None = None, num_frames: int = 16, size: int = 64
) -> tuple[Tensor, Tensor, Tensor, int, str]:
    """Draw one clip.

    Args:
        seed: seeds everything about the clip.
        label: index into :data:`ACTIONS`; drawn from the seed when ``None``.
        num_frames: ``T`` (>= 8).
        size: frame height and width ``H = W`` (>= 32); geometry scales with it.

    Returns:
        ``(clip (3, T, H, W) float, mask (T, H, W) bool, active (T,) bool, label, actor shape)``.
    """
    if num_frames < 8 or size < 32:
        raise ValueError(f"need num_frames >= 8 and size >= 32, got {num_frames} and {size}")
    gen = generator(seed)
    if label is None:
        label = int(torch.randint(len(ACTIONS), (1,), generator=gen).item())
    if not 0 <= label < len(ACTIONS):
        raise ValueError(f"label {label} is out of range 0..{len(ACTIONS) - 1}")
    action = ACTIONS[label]
    scale = size / 64.0
    T, H, W = num_frames, size, size

    # The action window: half to three quarters of the clip, never all of it.
    length = int(torch.randint(num_frames // 2, (3 * num_frames) // 4 + 1, (1,), generator=gen).item())
    start = int(torch.randint(0, num_frames - length + 1, (1,), generator=gen).item())
    active = torch.zeros(T, dtype=torch.bool)
    active[start : start + length] = True
    # progress[t]: 0 before the window, rising by 1 per active frame, constant after it.
    progress = [min(max(t - start + 1, 0), length) if t >= start else 0 for t in range(T)]

    shape = str(_choice(gen, _ROTATABLE if action == "rotate" else SHAPES))
    colour = COLOURS[str(_choice(gen, list(COLOURS)))]
    radius = _uniform(gen, 7.0, 9.5) * scale
    step = 2.0 * scale  # pixels per active frame for the moves
    travel = step * length
    angle0 = _uniform(gen, 0, math.pi / 2)
    margin = radius * 1.3 + 1
    dy, dx = {"move_left": (0, -1), "move_right": (0, 1), "move_up": (-1, 0), "move_down": (1, 0)}.get(action, (0, 0))
    # Start where the whole path stays inside the frame.
    y_low = margin + (travel if dy < 0 else 0)
    y_high = H - margin - (travel if dy > 0 else 0)
    x_low = margin + (travel if dx < 0 else 0)
    x_high = W - margin - (travel if dx > 0 else 0)
    cy0, cx0 = _uniform(gen, y_low, y_high), _uniform(gen, x_low, x_high)

    def actor_state(t: int) -> tuple[float, float, float, float, bool]:
        p = progress[t]
        cy, cx, r, angle, visible = cy0 + dy * step * p, cx0 + dx * step * p, radius, angle0, True
        if action == "grow":
            r = radius * (0.55 + 0.7 * p / length)
        elif action == "shrink":
            r = radius * (1.25 - 0.7 * p / length)
        elif action == "rotate":
            angle = angle0 + 0.16 * p
        elif action == "blink":
            visible = not (active[t] and ((t - start) // 2) % 2 == 1)
        return cy, cx, r, angle, visible

    # Distractors: two static shapes away from the actor's path, one diagonal drifter.
    path_y = [cy0, cy0 + dy * travel]
    path_x = [cx0, cx0 + dx * travel]
    statics = []
    for _ in range(2):
        for _attempt in range(20):
            r = _uniform(gen, 5.5, 8.5) * scale
            y, x = _uniform(gen, r + 1, H - r - 1), _uniform(gen, r + 1, W - r - 1)
            clear = radius * 1.3 + r + 2
            near_path = min(path_y) - clear < y < max(path_y) + clear and min(path_x) - clear < x < max(path_x) + clear
            if not near_path:
                break
        statics.append((str(_choice(gen, SHAPES)), y, x, r, _uniform(gen, 0, math.pi), COLOURS[str(_choice(gen, list(COLOURS)))]))
    drift_r = _uniform(gen, 5.0, 7.0) * scale
    drift_shape, drift_colour = str(_choice(gen, SHAPES)), COLOURS[str(_choice(gen, list(COLOURS)))]
    vy, vx = _choice(gen, [(-1, -1), (-1, 1), (1, -1), (1, 1)])
    drift_speed = 1.3 * scale
    span = drift_speed * (T - 1)
    dy0 = _uniform(gen, drift_r + 1 + (span if vy < 0 else 0), H - drift_r - 1 - (span if vy > 0 else 0))
    dx0 = _uniform(gen, drift_r + 1 + (span if vx < 0 else 0), W - drift_r - 1 - (span if vx > 0 else 0))

    background = textured_background(gen, H, W)
    static_masks = [(shape_mask(kind, y, x, r, H, W, angle), rgb) for kind, y, x, r, angle, rgb in statics]
    frames, masks = [], []
    for t in range(T):
        frame = background.clone()
        for static_mask, rgb in static_masks:
            paint(frame, static_mask, rgb, gen)
        drift = shape_mask(drift_shape, dy0 + vy * drift_speed * t, dx0 + vx * drift_speed * t, drift_r, H, W)
        paint(frame, drift, drift_colour, gen)
        cy, cx, r, angle, visible = actor_state(t)
        mask = shape_mask(shape, cy, cx, r, H, W, angle) if visible else torch.zeros(H, W, dtype=torch.bool)
        paint(frame, mask, colour, gen)
        # Faint per-frame sensor noise: nothing is pixel-exactly static.
        frame = (frame + 0.02 * torch.randn(frame.shape, generator=gen)).clamp(0, 1)
        frames.append(frame)
        masks.append(mask)
    clip = torch.stack(frames, dim=1)  # (3, T, H, W)
    return clip, torch.stack(masks), active, label, shape


def make_action_clips(
    n: int, seed: int = 0, num_frames: int = 16, size: int = 64, balanced: bool = True
) -> ActionClips:
    """``n`` seeded clips (see the module docstring).

    Args:
        n: number of clips.
        seed: base seed; clip ``i`` is drawn from ``(seed, i)``.
        num_frames, size: clip length ``T`` and frame size ``H = W``.
        balanced: labels cycle through the actions (``i % 8``) instead of being drawn.

    Returns:
        :class:`ActionClips` with clips ``(n, 3, T, H, W)``, masks ``(n, T, H, W)``, active ``(n, T)``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    clips, masks, actives, labels, shapes = [], [], [], [], []
    for i in range(n):
        clip, mask, active, label, shape = draw_action_clip(
            seed * 1_000_003 + i, i % len(ACTIONS) if balanced else None, num_frames, size
        )
        clips.append(clip)
        masks.append(mask)
        actives.append(active)
        labels.append(label)
        shapes.append(shape)
    return ActionClips(torch.stack(clips), torch.stack(masks), torch.stack(actives), torch.tensor(labels), shapes)
