"""Seeded synthetic data with exact ground-truth masks, one generator per task, all drawn with the
primitives of :mod:`.synthetic` (shapes, colours, textured backgrounds, one seed rule).

* :mod:`.scenes` -- multi-label shape scenes (classification), :func:`make_scenes`;
* :mod:`.captioned_scenes` -- scenes with a caption and a mask per word (captioning);
* :mod:`.action_clips` -- clips of one moving actor among distractors (video);
* :mod:`.distill_data` -- a 32x32 shape set for teacher-student distillation.

Imports only torch.
"""

from .action_clips import ACTIONS, ActionClips, draw_action_clip, make_action_clips
from .captioned_scenes import CAPTION_VOCABULARY, CaptionedScene, CaptionedScenes, make_captioned_scene, make_captioned_scenes
from .distill_data import DISTILL_CLASSES, DistillDataset, make_distill_dataset
from .scenes import SCENE_CLASSES, Scenes, make_scenes

__all__ = [
    "ACTIONS", "ActionClips", "CAPTION_VOCABULARY", "CaptionedScene", "CaptionedScenes", "DISTILL_CLASSES",
    "DistillDataset", "SCENE_CLASSES", "Scenes", "draw_action_clip", "make_action_clips", "make_captioned_scene",
    "make_captioned_scenes", "make_distill_dataset", "make_scenes",
]
