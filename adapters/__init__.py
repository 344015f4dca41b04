"""Task adapters (installed as ``multiexplain.adapters``), one thin module per task.

Each turns a task's model and inputs into one :class:`multiexplain.ExplainRequest` -- call
inputs, a score function, the layer (``"auto"``: the one resolver), the input size -- runs it with
:func:`multiexplain.explain_request` and presents the shared :class:`multiexplain.Explanation` for
its task (words for captioning, frames for video). No adapter chooses layers, hooks modules or
computes maps; ``methods=`` gives several methods' maps from one forward pass everywhere.

* :mod:`.classification` -- :func:`~.classification.explain_images` (top-1, given classes, top-k, multi-label);
* :mod:`.captioning` -- :func:`~.captioning.explain_caption` (a map per word);
* :mod:`.video` -- :func:`~.video.explain_clip` (space-time maps, SlowFast pathways);
* :mod:`.distillation` -- :class:`~.distillation.ExplanationLoss` (teacher vs student maps).
"""
