"""Model definitions multiexplain ships (and trains on its synthetic data), with one checkpoint
format (:mod:`.checkpoints`). Imports only torch.

* :class:`SceneCNN` -- multi-label scene classifier;
* :class:`ShowAttendTell` + :class:`CaptionVocabulary` -- the captioner;
* :class:`C3D` / :func:`c3d` -- the paper's 3D-conv video net and the shipped small variant;
* :class:`WideResNet` / :func:`wide_resnet` -- the distillation pair's architecture;
* :class:`MobileNetV2` / :func:`mobilenet_v2` -- the cross-family distillation student.
"""

from .conv3d import ACTION_C3D_STAGES, C3D, C3D_PAPER_STAGES, c3d, load_c3d_weights
from .checkpoints import (
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    SHIPPED,
    Checkpoint,
    load_action_c3d,
    load_checkpoint,
    load_distillation_pair,
    load_scene_classifier,
    load_show_and_tell,
    load_shipped,
    save_checkpoint,
    shipped_path,
)
from .mobilenet import MobileNetV2, mobilenet_v2
from .scene_cnn import SceneCNN
from .show_attend_tell import CaptionVocabulary, CellNorm, ShowAttendTell
from .wrn import WideResNet, wide_resnet

__all__ = [
    "ACTION_C3D_STAGES", "C3D", "C3D_PAPER_STAGES", "CHECKPOINT_DIR", "CHECKPOINT_FORMAT", "CaptionVocabulary",
    "CellNorm", "Checkpoint", "MobileNetV2", "SHIPPED", "SceneCNN", "ShowAttendTell", "WideResNet", "c3d", "load_c3d_weights",
    "load_action_c3d", "load_checkpoint", "load_distillation_pair", "load_scene_classifier", "load_shipped",
    "load_show_and_tell", "mobilenet_v2", "save_checkpoint", "shipped_path", "wide_resnet",
]
