"""Explain a whole data set, on one process or many (``torchrun``), into a resumable store.

``multiexplain explain-dataset`` and :func:`explain_dataset` run the same code. Items (see
:mod:`multiexplain.sources`) are numbered in a fixed order and grouped into chunks; chunk ``c``
belongs to rank ``c % world_size``, so every item is explained by exactly one process and the
assignment does not depend on timing. Each rank decodes its items in DataLoader workers, explains
them in batches on its device (batches never straddle a chunk, so the numbers do not depend on
the number of processes) and writes each finished chunk to the store
(:class:`multiexplain.store.MapStore`) atomically. A killed run (any rank, any moment) is
resumed by running the same command: finished chunks are skipped, a chunk that was being written
is redone. At the end the ranks add up their items' metrics with ``all_reduce`` and rank 0
writes ``index.jsonl``, ``metrics.json`` and an HTML report into the store folder.

Under ``torchrun`` the process group is set up here: gloo on CPU, NCCL on GPU (each rank on
``cuda:LOCAL_RANK``), multi-node by torchrun's own rendezvous.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from . import metrics
from .sources import Box, Item, ResizeCrop, boxes_mask, coco_instance_boxes, list_items, mask_files, voc_boxes
from .store import MapStore, chunk_ranges

__all__ = ["GroundTruth", "RunResult", "explain_dataset", "load_ground_truth"]

TASKS = ("classification", "video", "captioning")
LOC_DELTAS = (0.0, 0.25, 0.5)


# -- ground truth ---------------------------------------------------------------------------------

@dataclass
class GroundTruth:
    """The user's ground truth: boxes per image file (COCO / VOC) or a mask image per file stem."""

    boxes: dict[str, list[Box]] = field(default_factory=dict)
    masks: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def region(self, item: Item, label: str | None, size: tuple[int, int]) -> Tensor | None:
        """``(H, W)`` bool at the original image size, or ``None`` when the item has no ground truth."""
        if self.masks:
            path = self.masks.get(Path(item.key).stem)
            if path is None:
                return None
            from .io import read_mask

            mask = read_mask(path)
            if tuple(mask.shape) != size:
                raise ValueError(f"the mask {path} is {tuple(mask.shape)} but the image is {size}")
            return mask
        boxes = self.boxes.get(item.key, self.boxes.get(Path(item.key).name))
        if boxes is None:
            return None
        return boxes_mask(boxes, label, size)


def load_ground_truth(boxes: str | os.PathLike | None = None, masks: str | os.PathLike | None = None) -> GroundTruth | None:
    """Boxes from a COCO instances ``.json`` or a folder of Pascal VOC ``.xml``, or a folder of masks."""
    if boxes is not None and masks is not None:
        raise ValueError("give boxes or masks as ground truth, not both")
    if masks is not None:
        return GroundTruth(masks=mask_files(masks), source=str(masks))
    if boxes is None:
        return None
    path = Path(boxes)
    if path.is_dir():
        return GroundTruth(boxes=voc_boxes(path), source=str(path))
    if path.suffix == ".json":
        return GroundTruth(boxes=coco_instance_boxes(path), source=str(path))
    raise ValueError(f"--boxes {boxes}: give a COCO instances .json file or a folder of Pascal VOC .xml files")


# -- decoding (runs in DataLoader workers) ---------------------------------------------------------

class _Decoded(torch.utils.data.Dataset):
    """Items as model inputs: ``(item, input tensor | None, region on the input grid | None, error,
    warnings)``: decoding's warnings (a padded video, a transparent image) travel with the item
    into its row, from whichever worker process decoded it."""

    def __init__(self, items: Sequence[Item], load: Callable[[Item], tuple[Tensor, tuple[int, int]]],
                 geometry: ResizeCrop | None, ground_truth: GroundTruth | None, labels: Sequence[str] | None):
        self.items, self.load, self.geometry = list(items), load, geometry
        self.ground_truth, self.labels = ground_truth, labels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> tuple[Item, Tensor | None, Tensor | None, str | None, list[str]]:
        import warnings

        item = self.items[position]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                tensor, size = self.load(item)
            except (OSError, ValueError) as error:
                return item, None, None, " ".join(str(error).split())[:300], []
        notes = [" ".join(str(w.message).split())[:300] for w in caught]
        region = None
        if self.ground_truth is not None:
            region = self.ground_truth.region(item, item.label, size)
            if region is not None and self.geometry is not None:
                region = self.geometry.to_input(region)
        return item, tensor, region, None, notes


def _collate(batch: list) -> list:
    return batch


# -- one batch -------------------------------------------------------------------------------------

@dataclass
class _Context:
    task: str
    loaded: Any
    methods: tuple[str, ...]
    upsample: bool
    dtype: torch.dtype
    tolerance: float
    target: str
    layer: str
    class_index: dict[str, int]
    batch_size: int = 16
    window: int | None = None  # video: frames per window of the whole-video mode (None: one clip per video)
    stride: int = 1
    normalisation: tuple | None = None  # video: (mean, std) applied to the frames, or None


def _targets(context: _Context, items: Sequence[Item], logits: Tensor) -> Tensor:
    """The class each item is explained for: its label when the data gives one (and target="label"),
    else the model's top-1."""
    top = logits.argmax(dim=1)
    if context.target != "label":
        return top
    chosen = []
    for item, fallback in zip(items, top.tolist()):
        if item.label is not None and item.label not in context.class_index:
            raise ValueError(f"{item.path}: label {item.label!r} is not a class of the model "
                             f"(first classes: {list(context.class_index)[:5]}); use --target top1")
        chosen.append(context.class_index.get(item.label, fallback) if item.label is not None else fallback)
    return torch.tensor(chosen, device=logits.device)


def _classification(context: _Context, batch: list) -> list[tuple[dict, dict[str, Tensor]]]:
    from .adapters.classification import explain_images
    from .explain import model_logits

    items = [entry[0] for entry in batch]
    inputs = torch.stack([entry[1] for entry in batch]).to(context.loaded.device)
    with torch.no_grad():
        logits = model_logits(context.loaded.model(inputs)).float()
    multi_label = bool(getattr(context.loaded.model, "multi_label", False))
    probabilities = logits.sigmoid() if multi_label else logits.softmax(dim=1)
    targets = _targets(context, items, logits)
    explained = explain_images(context.loaded.model, inputs, targets=targets, methods=context.methods,
                               layer=context.layer, reshape=context.loaded.reshape)
    labels = context.loaded.labels
    results = []
    for i, (item, _, region, *_rest) in enumerate(batch):
        target = int(targets[i])
        row: dict[str, Any] = {
            "target": target, "target_label": labels[target] if labels and target < len(labels) else None,
            "prediction": int(logits[i].argmax()), "probability": float(probabilities[i, target]),
            "label": item.label, "layer": explained[context.methods[0]].layer, "metrics": {},
        }
        tensors: dict[str, Tensor] = {}
        for method, explanation in explained.items():
            row.setdefault("scores", {})[method] = float(explanation.scores[i])
            tensors[f"{method}/raw"] = explanation.raw[i].detach().to("cpu", context.dtype)
            if context.upsample:
                tensors[f"{method}/maps"] = explanation.maps[i].detach().to("cpu", context.dtype)
            if region is not None:
                row["metrics"][method] = _localisation(explanation.maps[i], region.to(explanation.maps.device), context.tolerance)
        results.append((row, tensors))
    return results


def _localisation(map_: Tensor, region: Tensor, tolerance: float) -> dict[str, float]:
    """Loc(delta) at 0 / 0.25 / 0.5, pointing game within ``tolerance`` input pixels, energy in the region."""
    if tuple(region.shape) != tuple(map_.shape):
        raise ValueError(f"the ground truth on the input grid is {tuple(region.shape)} but the map is {tuple(map_.shape)}")
    maps, masks = map_[None].float(), region[None]
    values = {f"loc_{delta}": float(metrics.localization(maps, masks, delta)[0]) for delta in LOC_DELTAS}
    values["pointing"] = float(metrics.pointing_game(maps, masks, tolerance=tolerance)[0])
    values["energy"] = float(metrics.energy_pointing_game(maps, masks)[0])
    values["has_region"] = float(bool(region.any()))
    return values


def _video(context: _Context, batch: list) -> list[tuple[dict, dict[str, Tensor]]]:
    from .adapters.video import explain_clip

    clips = torch.stack([entry[1] for entry in batch]).to(context.loaded.device)
    explained = explain_clip(context.loaded.model, clips, methods=context.methods, layer=context.layer)
    first = explained[context.methods[0]]
    labels = context.loaded.labels
    results = []
    for i, (item, *_rest) in enumerate(batch):
        target = int(first.targets[i])
        row: dict[str, Any] = {"target": target, "target_label": labels[target] if labels and target < len(labels) else None,
                               "label": item.label, "layer": first.layer, "metrics": {}, "scores": {}}
        tensors = {}
        for method, explanation in explained.items():
            row["scores"][method] = float(explanation.scores[i])
            tensors[f"{method}/raw"] = explanation.raw[i].detach().to("cpu", context.dtype)
            if context.upsample:
                tensors[f"{method}/maps"] = explanation.maps[i].detach().to("cpu", context.dtype)
        results.append((row, tensors))
    return results


def _video_windows(context: _Context, batch: list) -> list[tuple[dict, dict[str, Tensor]]]:
    """Whole videos, ``context.window`` frames at a time every ``context.stride`` frames, as
    ``multiexplain video --window`` does: each window explains its own top-1 class; the store keeps
    every window's layer-resolution maps (``{method}/window_raw``, ``(windows, T', h, w)``) and their
    first frames (``window_starts``), and with ``upsample`` one blended map per frame
    (``{method}/maps``, ``(T, H, W)``, :class:`~multiexplain.adapters.video.WindowBlend`)."""
    from .adapters.video import WindowBlend, explain_clip, normalize_clip, window_starts

    labels, methods = context.loaded.labels, context.methods
    results = []
    for item, frames, *_rest in batch:
        video = frames.float().div(255)  # (3, T, H, W)
        if context.normalisation is not None:
            video = normalize_clip(video, *context.normalisation)
        starts = window_starts(video.shape[1], context.window, context.stride)
        blends = {method: WindowBlend() for method in methods}
        raw: dict[str, list[Tensor]] = {method: [] for method in methods}
        blended: dict[str, list[Tensor]] = {method: [] for method in methods}
        windows, layer = [], None
        for first in range(0, len(starts), context.batch_size):
            group = starts[first : first + context.batch_size]
            clips = torch.stack([video[:, start : start + context.window] for start in group]).to(context.loaded.device)
            explained = explain_clip(context.loaded.model, clips, methods=methods, layer=context.layer)
            layer = explained[methods[0]].layer
            for j, start in enumerate(group):
                target = int(explained[methods[0]].targets[j])
                windows.append({"start_frame": start, "end_frame": start + context.window - 1, "target": target,
                                "target_label": labels[target] if labels and target < len(labels) else None,
                                "scores": {method: float(explained[method].scores[j]) for method in methods}})
                for method in methods:
                    raw[method].append(explained[method].raw[j].detach().to("cpu", context.dtype))
                    if context.upsample:
                        blends[method].add(start, explained[method].maps[j])
            if context.upsample:  # frames no later window covers are final: keep memory to one window's maps
                before = starts[first + len(group)] if first + len(group) < len(starts) else None
                for method in methods:
                    blended[method] += [m.to("cpu", context.dtype) for _, m in blends[method].pop(before)]
        counts: dict[int, int] = {}
        for window in windows:
            counts[window["target"]] = counts.get(window["target"], 0) + 1
        target = max(counts, key=counts.get)
        row: dict[str, Any] = {"target": target, "target_label": labels[target] if labels and target < len(labels) else None,
                               "label": item.label, "layer": layer, "metrics": {}, "frames": int(video.shape[1]),
                               "window": context.window, "stride": context.stride, "windows": windows}
        tensors: dict[str, Tensor] = {"window_starts": torch.tensor(starts)}
        for method in methods:
            tensors[f"{method}/window_raw"] = torch.stack(raw[method])
            if context.upsample:
                tensors[f"{method}/maps"] = torch.stack(blended[method])
        results.append((row, tensors))
    return results


def _captioning(context: _Context, batch: list) -> list[tuple[dict, dict[str, Tensor]]]:
    from .adapters.captioning import explain_caption

    images = [entry[1] for entry in batch]
    captions = [entry[0].captions[0] for entry in batch]
    extra = context.loaded.extra
    explained = explain_caption(context.loaded.model, images, captions, processor=extra.get("processor"),
                                tokenizer=extra.get("tokenizer"), methods=context.methods, target_layer=context.layer)
    results = []
    for i, (item, *_rest) in enumerate(batch):
        first = explained[context.methods[0]][i]
        row: dict[str, Any] = {"caption": first.caption, "words": first.words, "layer": first.layer,
                               "word_scores": [float(v) for v in first.scores], "caption_score": float(first.caption_score),
                               "label": None, "metrics": {}}
        tensors = {}
        for method in context.methods:
            explanation = explained[method][i]
            tensors[f"{method}/raw"] = explanation.raw.detach().to("cpu", context.dtype)
            tensors[f"{method}/caption_raw"] = explanation.caption_raw.detach().to("cpu", context.dtype)
            if context.upsample:
                tensors[f"{method}/maps"] = explanation.maps.detach().to("cpu", context.dtype)
        results.append((row, tensors))
    return results


_EXPLAIN = {"classification": _classification, "video": _video, "captioning": _captioning}


# -- the run ----------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """What a run did: the store, item counts, the aggregated metrics and the seconds it took."""

    out: Path
    items: int
    explained: int
    skipped: list[dict[str, Any]]
    metrics: dict[str, Any]
    seconds: float
    rank: int = 0
    world_size: int = 1


def _distributed() -> tuple[bool, int, int, bool]:
    """``(distributed, rank, world size, created here)``; sets up the process group under torchrun."""
    import torch.distributed as dist

    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        created = True
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size(), created
    return False, 0, 1, created


def _device(device: str, distributed: bool) -> str:
    if distributed and torch.cuda.is_available() and device in ("auto", "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def _loader(task: str, loaded: Any, frames: int | None, size: int | None,
            window: int | None = None) -> Callable[[Item], tuple[Tensor, tuple[int, int]]]:
    """``item -> (model input, original (H, W))``: how a worker decodes one item."""
    from . import io

    if task == "video":
        from .adapters.video import normalize_clip

        clip_frames, side, normalisation = loaded.video_geometry(window or frames)
        side = size or side

        def load_clip(item: Item) -> tuple[Tensor, tuple[int, int]]:
            clip, _fps = io.read_clip(item.path, num_frames=clip_frames, size=side)
            if normalisation is not None:
                clip = normalize_clip(clip, *normalisation)
            return clip, tuple(clip.shape[-2:])

        def load_video(item: Item) -> tuple[Tensor, tuple[int, int]]:
            # Every frame, as uint8 (a quarter of float32's size) at the model's frame size: the main
            # process slides the windows over it. A video shorter than a window is padded (with a warning).
            with io.VideoReader(item.path, size=side) as reader:
                if reader.info.num_frames < clip_frames:
                    video = reader.clip(clip_frames).frames.mul(255).round().to(torch.uint8)
                else:
                    video = torch.stack([frame for _, _, frame in reader.frames()], dim=1)
            return video, tuple(video.shape[-2:])

        return load_clip if window is None else load_video
    if task == "captioning":
        side = size or getattr(loaded.model, "image_size", None)

        def load_caption_image(item: Item) -> tuple[Tensor, tuple[int, int]]:
            image = io.read_image(item.path)
            original = (image.height, image.width)
            if loaded.extra.get("processor") is None and isinstance(side, int):
                image = image.resize((side, side))
            return io.image_to_tensor(image), original

        return load_caption_image
    preprocess = loaded.preprocess

    def load_image(item: Item) -> tuple[Tensor, tuple[int, int]]:
        image = io.read_image(item.path)
        return preprocess(image), (image.height, image.width)

    return load_image


def explain_dataset(
    task: str,
    model: str,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    arch: str | None = None,
    images: str | os.PathLike | None = None,
    methods: Sequence[str] = ("gradcam++", "gradcam"),
    layer: str = "auto",
    boxes: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    target: str = "label",
    tolerance: float = 15.0,
    batch_size: int = 16,
    chunk_size: int = 64,
    workers: int = 0,
    device: str = "auto",
    upsample: bool = False,
    dtype: str = "float16",
    frames: int | None = None,
    size: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    progress: bool = True,
) -> RunResult:
    """Explain every item of ``data`` with ``model`` (a SPEC, see :mod:`multiexplain.zoo`) into the store ``out``.

    Args:
        task: ``classification`` (an image folder, ImageFolder layout or list file), ``video`` (a
            folder or list of videos: one clip of ``frames`` frames sampled over each, or with
            ``window`` the whole video) or ``captioning`` (a COCO captions JSON).
        methods: registered method names; all come from one forward pass per batch.
        boxes / masks: ground truth (COCO instances JSON or a VOC XML folder / a folder of masks):
            per-item Loc(delta), pointing game within ``tolerance`` input pixels (15: Zhang et al.'s
            convention), energy in the region, and their class means in ``metrics.json``.
        target: ``"label"`` explains the class the data names (folder or list label), else the top-1;
            ``"top1"`` always the model's top-1.
        batch_size, chunk_size: items per forward pass and per store chunk (a chunk is the unit of
            resuming; ``chunk_size`` should be a multiple of ``batch_size``).
        workers: DataLoader worker processes decoding items (0: in the main process).
        upsample: also store the maps at the input's resolution (besides the layer-resolution maps).
        dtype: ``float16`` (default) or ``float32`` for the stored maps.
        window, stride: video only: explain the whole video ``window`` frames at a time (0: the
            model's clip length) every ``stride`` frames (default half a window), as
            ``multiexplain video --window`` does; see :func:`_video_windows` for what is stored.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if target not in ("label", "top1"):
        raise ValueError(f"target must be 'label' or 'top1', got {target!r}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be >= 1")
    if window is not None and task != "video":
        raise ValueError("window is for video runs (the whole video, window by window)")
    if stride is not None and window is None:
        raise ValueError("stride needs window (the whole video, window by window)")
    if window is not None and frames is not None:
        raise ValueError("give window (the whole video) or frames (one clip per video), not both")
    if (window is not None and window < 0) or (stride is not None and stride < 1) or (frames is not None and frames < 1):
        raise ValueError(f"frames, window and stride must be positive numbers of frames, got "
                         f"frames={frames}, window={window}, stride={stride}")
    from . import zoo
    from .explain import method_names

    names, _ = method_names(methods=methods)
    started = time.perf_counter()
    distributed, rank, world, created = _distributed()
    try:
        loaded = zoo.load_model(model, arch=arch, task=task, device=_device(device, distributed))
        ground_truth = load_ground_truth(boxes, masks)
        if ground_truth is not None and task != "classification":
            raise ValueError("ground-truth boxes and masks are read for classification runs (images)")
        _plain_preprocessing(loaded, task, size)
        if ground_truth is not None and loaded.geometry is None:
            raise ValueError(f"{model}'s preprocessing has no known geometry, so ground truth drawn on the original "
                             "images cannot be carried onto the model's input")
        items = list_items(data, task, images=images)
        if task == "captioning":
            items = _caption_pairs(items)
        store = MapStore(out)
        settings = {"task": task, "model": model, "arch": arch, "data": str(data), "items": len(items),
                    "methods": list(names), "layer": layer, "target": target, "tolerance": tolerance,
                    "chunk_size": chunk_size, "batch_size": batch_size, "upsample": upsample, "dtype": dtype,
                    "ground_truth": ground_truth.source if ground_truth is not None else None,
                    "frames": frames, "size": size, "window": window, "stride": stride}
        _open_store(store, settings, rank, distributed)
        chunks = chunk_ranges(len(items), chunk_size)
        mine = [c for c in range(len(chunks)) if c % world == rank and not store.is_done(c, len(chunks[c]))]
        class_index = {name: i for i, name in enumerate(loaded.labels or [])}
        context = _Context(task, loaded, names, upsample, getattr(torch, dtype), tolerance, target, layer, class_index,
                           batch_size)
        if window is not None:
            context.window, _side, context.normalisation = loaded.video_geometry(window or None)
            context.stride = stride or max(1, context.window // 2)
        began = time.perf_counter()
        _explain_chunks(store, context, items, chunks, mine, workers, batch_size, task, frames, size, ground_truth,
                        rank, world, progress)
        # This run's throughput: the items it explained over the slowest rank's explaining time.
        timing = torch.tensor([time.perf_counter() - began, sum(len(chunks[c]) for c in mine)], dtype=torch.float64)
        if distributed:
            import torch.distributed as dist

            dist.barrier()
            seconds = timing[:1].clone()
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            dist.all_reduce(timing)
            timing[0] = seconds[0]
        totals = _aggregate(store, [c for c in range(len(chunks)) if c % world == rank], names, loaded.labels, distributed)
        totals["this_run"] = {"processes": world, "items": int(timing[1]), "explain_seconds": float(timing[0]),
                              "items_per_second": float(timing[1] / timing[0]) if timing[0] > 0 else 0.0}
        if rank == 0:
            store.write_index(list(range(len(chunks))))
            store.write_json("metrics.json", totals)
            _write_report(store, settings, totals)
        if distributed:
            import torch.distributed as dist

            dist.barrier()
        return RunResult(Path(out), len(items), totals["explained"], totals["skipped"], totals,
                         time.perf_counter() - started, rank, world)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _plain_preprocessing(loaded: Any, task: str, size: int | None) -> None:
    """A classifier without its own preprocessing (the shipped scene classifier) takes the image
    resized to ``size`` (default 64) x ``size``, normalised with the model's mean and std."""
    if task != "classification" or loaded.preprocess is not None:
        return
    from .zoo import plain_preprocess

    side = size or 64
    loaded.preprocess = lambda image: plain_preprocess(image, side, loaded.mean, loaded.std)
    loaded.geometry = ResizeCrop(size=(side, side))


def _caption_pairs(items: list[Item]) -> list[Item]:
    """One item per (image, caption) pair."""
    pairs = []
    for item in items:
        for k, caption in enumerate(item.captions):
            pairs.append(Item(len(pairs), item.path, f"{item.key}#{k}", None, (caption,)))
    return pairs


def _open_store(store: MapStore, settings: dict, rank: int, distributed: bool) -> None:
    """Rank 0 creates (or checks) the store first; the others then check it."""
    if rank == 0:
        store.open(settings, create=True)
        store.remove_partial_files()
    if distributed:
        import torch.distributed as dist

        dist.barrier()
    if rank != 0:
        store.open(settings, create=False)


class _ChunkBatches(torch.utils.data.Sampler):
    """Batches of positions that never straddle a chunk: ``[[positions of a batch], ...]``."""

    def __init__(self, chunk_sizes: Sequence[int], batch_size: int):
        self.batches, start = [], 0
        for size in chunk_sizes:
            self.batches += [list(range(start + i, start + min(i + batch_size, size))) for i in range(0, size, batch_size)]
            start += size

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _explain_chunks(store: MapStore, context: _Context, items: list[Item], chunks: list[range], mine: list[int],
                    workers: int, batch_size: int, task: str, frames: int | None, size: int | None,
                    ground_truth: GroundTruth | None, rank: int, world: int, progress: bool) -> None:
    """Decode, explain and write this rank's unfinished chunks, in order."""
    ordered = [items[i] for c in mine for i in chunks[c]]
    if not ordered:
        return
    dataset = _Decoded(ordered, _loader(task, context.loaded, frames, size, context.window), context.loaded.geometry, ground_truth,
                       context.loaded.labels)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=_ChunkBatches([len(chunks[c]) for c in mine], batch_size),
                                         num_workers=workers, collate_fn=_collate)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ordered), desc=f"explain ({world} process{'es' if world > 1 else ''})", unit="item")
    pending = list(mine)
    rows: list[dict] = []
    tensors: dict[str, Tensor] = {}
    explain = _video_windows if context.window is not None else _EXPLAIN[task]
    for batch in loader:
        usable = [entry for entry in batch if entry[1] is not None]
        for item, _tensor, _region, error, _notes in batch:
            if error is not None:
                rows.append({"item": item.index, "key": item.key, "path": item.path, "status": "skipped", "error": error,
                             "file": store.tensor_path(pending[0]).name})
        if usable:
            for (item, *_rest, notes), (row, item_tensors) in zip(usable, explain(context, usable)):
                rows.append({"item": item.index, "key": item.key, "path": item.path, "status": "ok",
                             "file": store.tensor_path(pending[0]).name, **row, **({"warnings": notes} if notes else {})})
                tensors.update({f"{item.index}/{name}": value for name, value in item_tensors.items()})
        if bar is not None:
            bar.update(len(batch) * world)
        if len(rows) == len(chunks[pending[0]]):
            store.write_chunk(pending.pop(0), rows, tensors)
            rows, tensors = [], {}
    if bar is not None:
        bar.close()


def _aggregate(store: MapStore, owned: list[int], methods: tuple[str, ...], labels: list[str] | None,
               distributed: bool) -> dict[str, Any]:
    """Metric means over every item (and per-class means), added up across ranks with all_reduce.

    Each rank reads the rows of the chunks it owns from the store (not from memory), so a resumed
    run aggregates the items of earlier runs too."""
    names = ["pointing", "energy", *(f"loc_{d}" for d in LOC_DELTAS)]
    num_classes = max(1, len(labels or []))
    sums = torch.zeros(len(methods), len(names), num_classes + 1, dtype=torch.float64)  # last column: all
    counts = torch.zeros(len(methods), num_classes + 1, dtype=torch.float64)
    done = torch.zeros(2, dtype=torch.float64)  # explained, skipped
    skipped: list[dict[str, Any]] = []
    warned: list[dict[str, Any]] = []
    for chunk in owned:
        for row in store.rows(chunk):
            if row["status"] != "ok":
                done[1] += 1
                skipped.append({"item": row["item"], "path": row["path"], "error": row["error"]})
                continue
            done[0] += 1
            warned += [{"item": row["item"], "path": row["path"], "warning": note} for note in row.get("warnings", [])]
            for m, method in enumerate(methods):
                values = row.get("metrics", {}).get(method)
                if not values or not values.get("has_region"):
                    continue
                column = row["target"] if labels and row.get("target", -1) < num_classes else None
                for n, name in enumerate(names):
                    sums[m, n, -1] += values[name]
                    if column is not None:
                        sums[m, n, column] += values[name]
                counts[m, -1] += 1
                if column is not None:
                    counts[m, column] += 1
    if distributed:
        import torch.distributed as dist

        for tensor in (sums, counts, done):
            dist.all_reduce(tensor)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (skipped, warned))
        skipped = sorted((entry for part, _ in gathered for entry in part), key=lambda entry: entry["item"])
        warned = sorted((entry for _, part in gathered for entry in part), key=lambda entry: entry["item"])
    result: dict[str, Any] = {"explained": int(done[0]), "skipped": skipped, "skipped_count": int(done[1]),
                              "warnings": warned, "methods": {}}
    for m, method in enumerate(methods):
        if counts[m, -1] == 0:
            continue
        present = [c for c in range(num_classes) if counts[m, c] > 0]
        result["methods"][method] = {
            "items_with_ground_truth": int(counts[m, -1]),
            **{f"{name} (mean over items)": float(sums[m, n, -1] / counts[m, -1]) for n, name in enumerate(names)},
            **({f"{name} (class mean)": float(sum(float(sums[m, n, c] / counts[m, c]) for c in present) / len(present))
                for n, name in enumerate(names)} if present and labels else {}),
        }
    return result


def _write_report(store: MapStore, settings: dict, totals: dict) -> None:
    from .report import Report, write_report

    report = Report("multiexplain explain-dataset", intro=f"{totals['explained']} items explained, "
                    f"{totals['skipped_count']} skipped, from {settings['data']}.")
    section = report.section("dataset", "Data set run")
    if totals["methods"]:
        methods = list(totals["methods"])
        keys = list(next(iter(totals["methods"].values())))
        section.add_table(["metric", *methods], [[key, *(totals["methods"][m].get(key) for m in methods)] for key in keys],
                          f"Pointing game within {settings['tolerance']:g} input pixels; Loc(delta) is the paper's eq. 26.")
    if totals["skipped"]:
        section.add_note("Skipped: " + "; ".join(f"{s['path']} ({s['error']})" for s in totals["skipped"][:20])
                         + (f"; and {len(totals['skipped']) - 20} more" if len(totals["skipped"]) > 20 else ""))
    if totals["warnings"]:
        section.add_note("Warnings: " + "; ".join(f"{w['path']} ({w['warning']})" for w in totals["warnings"][:20])
                         + (f"; and {len(totals['warnings']) - 20} more" if len(totals["warnings"]) > 20 else ""))
    section.add_settings({k: v for k, v in settings.items() if v is not None})
    write_report(report, store.root)
