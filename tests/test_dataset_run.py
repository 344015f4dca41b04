"""Explaining a whole data set: one process and torchrun give one store, killed runs resume, the
user's ground truth gives the localisation metrics, bad items are named and counted."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multiexplain import cli
from multiexplain.data import SCENE_CLASSES, make_scenes
from multiexplain.dataset_run import explain_dataset
from multiexplain.sources import Box, ResizeCrop, boxes_mask, coco_instance_boxes, list_items, voc_boxes
from multiexplain.store import MapStore

ROOT = Path(__file__).resolve().parents[1]


def _scene_folder(root: Path, n: int, seed: int = 7) -> tuple[Path, Path]:
    """``n`` generated scenes saved as PNGs in ImageFolder layout (the class with most instances),
    and a COCO instances JSON with each scene's box of that class."""
    scenes = make_scenes(n, seed=seed)
    images, annotations = [], []
    for i in range(n):
        cls = int(scenes.instance_counts()[i].argmax())
        name = SCENE_CLASSES[cls]
        path = root / "images" / name / f"scene_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((scenes.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        ys, xs = scenes.class_masks[i, cls].nonzero(as_tuple=True)
        images.append({"id": i, "file_name": f"{name}/scene_{i:03d}.png", "height": 64, "width": 64})
        annotations.append({"id": i, "image_id": i, "category_id": cls,
                            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]})
    categories = [{"id": c, "name": s} for c, s in enumerate(SCENE_CLASSES)]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root / "images", root / "instances.json"


def _command(data: Path, out: Path, boxes: Path | None = None, chunk: int = 8, batch: int = 4, extra: tuple = ()) -> list[str]:
    command = ["explain-dataset", "--task", "classification", "--model", "builtin:scene-classifier", "--data", str(data),
               "--out", str(out), "--chunk-size", str(chunk), "--batch-size", str(batch), "--workers", "0",
               "--device", "cpu", "--quiet", "--dtype", "float32", *extra]
    return command + (["--boxes", str(boxes)] if boxes is not None else [])


def _same_store(first: Path, second: Path) -> None:
    a, b = MapStore(first), MapStore(second)
    rows_a, rows_b = a.index(), b.index()
    assert [r["item"] for r in rows_a] == list(range(len(rows_a))) == [r["item"] for r in rows_b]
    for (row_a, tensors_a), (row_b, tensors_b) in zip(a.items(), b.items()):
        assert row_a["key"] == row_b["key"] and row_a["target"] == row_b["target"]
        assert set(tensors_a) == set(tensors_b) and tensors_a
        for name in tensors_a:
            torch.testing.assert_close(tensors_a[name], tensors_b[name], atol=1e-6, rtol=0)
        for method, values in row_a["metrics"].items():
            for key, value in values.items():
                assert row_b["metrics"][method][key] == pytest.approx(value, abs=1e-9)
    metrics_a = json.loads((first / "metrics.json").read_text())["methods"]
    metrics_b = json.loads((second / "metrics.json").read_text())["methods"]
    for method in metrics_a:
        for key, value in metrics_a[method].items():
            assert metrics_b[method][key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.slow
def test_one_process_and_two_torchrun_processes_write_the_same_store(tmp_path):
    data, boxes = _scene_folder(tmp_path, 36)
    assert cli.main(_command(data, tmp_path / "one", boxes)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "multiexplain", *_command(data, tmp_path / "two", boxes)],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "explained 36 of 36 items" in run.stdout and "2 process(es)" in run.stdout
    _same_store(tmp_path / "one", tmp_path / "two")
    # Chunk c belongs to rank c % 2: every item exactly once, no chunk written twice.
    assert len(list((tmp_path / "two").glob("chunk-*.safetensors"))) == math.ceil(36 / 8)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_store(tmp_path):
    data, boxes = _scene_folder(tmp_path, 60)
    assert cli.main(_command(data, tmp_path / "whole", boxes, chunk=4, batch=4)) == 0
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "multiexplain", *_command(data, out, boxes, chunk=4, batch=4)]
    process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(out.glob("chunk-*.safetensors"))) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(list(out.glob("chunk-*.safetensors")))
    assert 3 <= written < 15 and not (out / "index.jsonl").exists(), "the run must be killed mid-way"
    # A damaged chunk (a disk error after the rename) is not taken as done either.
    first = sorted(out.glob("chunk-*.safetensors"))[0]
    first.write_bytes(first.read_bytes()[:50])
    assert cli.main(_command(data, out, boxes, chunk=4, batch=4)) == 0
    _same_store(tmp_path / "whole", out)
    assert not list(out.glob(".chunk-*.tmp"))


def test_coco_boxes_give_the_localisation_metrics_computed_by_hand(tmp_path):
    data, boxes = _scene_folder(tmp_path, 6)
    result = explain_dataset("classification", "builtin:scene-classifier", data, tmp_path / "store", boxes=boxes,
                             tolerance=0, upsample=True, dtype="float32", batch_size=3, chunk_size=3, progress=False)
    assert result.explained == 6 and not result.skipped
    truth = coco_instance_boxes(boxes)
    expected: dict[str, list[dict[str, float]]] = {"gradcam++": [], "gradcam": []}
    for row, tensors in MapStore(tmp_path / "store").items():
        assert row["target"] == SCENE_CLASSES.index(row["label"])  # the folder's class is explained
        (box,) = truth[row["key"]]
        x0, y0, x1, y1 = int(box.x0), int(box.y0), int(box.x1), int(box.y1)
        for method in expected:
            m = tensors[f"{method}/maps"].double().numpy()  # (64, 64) in [0, 1]
            inside = np.zeros_like(m, dtype=bool)
            inside[y0:y1, x0:x1] = True
            values = {}
            for delta in (0.0, 0.25, 0.5):
                above = (m - m.min()) / (m.max() - m.min()) > delta
                values[f"loc_{delta}"] = (above & inside).sum() / (inside.sum() + (above & ~inside).sum())
            peak = np.unravel_index(np.argmax(m), m.shape)
            values["pointing"] = float(inside[peak])
            values["energy"] = m[inside].sum() / m.sum()
            for key, value in values.items():
                assert row["metrics"][method][key] == pytest.approx(value, abs=1e-9), (row["key"], method, key)
            expected[method].append(values)
    summary = json.loads((tmp_path / "store" / "metrics.json").read_text())["methods"]
    for method, rows in expected.items():
        for key in rows[0]:
            assert summary[method][f"{key} (mean over items)"] == pytest.approx(np.mean([r[key] for r in rows]), abs=1e-9)
    # Class mean: the mean over classes of each class's mean.
    labels = [row["label"] for row, _ in MapStore(tmp_path / "store").items()]
    by_class = {}
    for label, values in zip(labels, expected["gradcam++"]):
        by_class.setdefault(label, []).append(values["pointing"])
    class_mean = np.mean([np.mean(v) for v in by_class.values()])
    assert summary["gradcam++"]["pointing (class mean)"] == pytest.approx(class_mean, abs=1e-9)
    assert (tmp_path / "store" / "index.html").is_file()


def test_the_store_reads_back_without_multiexplain(tmp_path):
    data, _ = _scene_folder(tmp_path, 4)
    explain_dataset("classification", "builtin:scene-classifier", data, tmp_path / "store", batch_size=2,
                    chunk_size=2, progress=False)
    code = ("import json, safetensors.torch\n"
            f"row = json.loads(open({str(tmp_path / 'store' / 'index.jsonl')!r}).readline())\n"
            f"maps = safetensors.torch.load_file({str(tmp_path / 'store')!r} + '/' + row['file'])[f\"{{row['item']}}/gradcam++/raw\"]\n"
            "assert 'multiexplain' not in __import__('sys').modules\n"
            "print(tuple(maps.shape), maps.dtype, row['target_label'])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith("(16, 16) torch.float16")


def test_unreadable_items_are_skipped_named_and_counted(tmp_path, capsys):
    data, _ = _scene_folder(tmp_path, 5)
    broken = data / "circle" / "broken.png"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"not a png")
    assert cli.main(_command(data, tmp_path / "store", chunk=3, batch=3)) == 0
    captured = capsys.readouterr()
    assert "explained 5 of 6 items (1 skipped)" in captured.out
    assert "multiexplain explain-dataset: error:" in captured.err and "broken.png" in captured.err
    summary = json.loads((tmp_path / "store" / "metrics.json").read_text())
    assert summary["skipped_count"] == 1 and summary["skipped"][0]["path"].endswith("broken.png")
    rows = MapStore(tmp_path / "store").index()
    assert [r["status"] for r in rows].count("skipped") == 1 and len(rows) == 6


def test_a_store_with_other_settings_is_refused(tmp_path, capsys):
    data, _ = _scene_folder(tmp_path, 3)
    assert cli.main(_command(data, tmp_path / "store")) == 0
    assert cli.main(_command(data, tmp_path / "store", extra=("--methods", "gradcam"))) == 2
    assert "holds a run with other settings" in capsys.readouterr().err


def test_item_lists_folders_and_ground_truth_formats(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("b.png", "a.jpg"):
        Image.new("RGB", (8, 8)).save(flat / name)
    assert [(i.key, i.label) for i in list_items(flat, "classification")] == [("a.jpg", None), ("b.png", None)]
    listing = tmp_path / "list.txt"
    listing.write_text("# path label\nflat/a.jpg circle\nflat/b.png\n")
    items = list_items(listing, "classification")
    assert [(Path(i.path).name, i.label) for i in items] == [("a.jpg", "circle"), ("b.png", None)]
    voc = tmp_path / "voc"
    voc.mkdir()
    (voc / "a.xml").write_text("<annotation><filename>a.jpg</filename><object><name>dog</name><bndbox><xmin>2</xmin>"
                               "<ymin>3</ymin><xmax>5</xmax><ymax>7</ymax></bndbox></object></annotation>")
    (box,) = voc_boxes(voc)["a.jpg"]
    assert (box.label, box.x0, box.y0, box.x1, box.y1) == ("dog", 1, 2, 5, 7)  # 1-based inclusive -> 0-based exclusive
    mask = boxes_mask([box, Box("cat", 0, 0, 1, 1)], "dog", (8, 8))
    assert mask.sum() == 4 * 5 and mask[2:7, 1:5].all()
    (voc / "bad.xml").write_text("<annotation><object>")
    with pytest.raises(ValueError, match="bad.xml is not a Pascal VOC annotation"):
        voc_boxes(voc)
    with pytest.raises(FileNotFoundError, match="no such folder or list file"):
        list_items(tmp_path / "nowhere", "classification")


def test_masks_as_ground_truth(tmp_path):
    data, _ = _scene_folder(tmp_path, 3)
    scenes = make_scenes(3, seed=7)
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(3):
        cls = int(scenes.instance_counts()[i].argmax())
        Image.fromarray(scenes.class_masks[i, cls].numpy().astype(np.uint8) * 255).save(masks / f"scene_{i:03d}.png")
    result = explain_dataset("classification", "builtin:scene-classifier", data, tmp_path / "store", masks=masks,
                             tolerance=0, upsample=True, dtype="float32", progress=False)
    for row, tensors in MapStore(tmp_path / "store").items():
        i = int(row["key"].split("_")[-1].split(".")[0])
        region = scenes.class_masks[i, SCENE_CLASSES.index(row["label"])]
        m = tensors["gradcam++/maps"]
        energy = float((m * region).sum() / m.sum())
        assert row["metrics"]["gradcam++"]["energy"] == pytest.approx(energy, abs=1e-6)
    assert result.metrics["methods"]["gradcam++"]["items_with_ground_truth"] == 3


def test_resize_crop_follows_torchvision_preprocessing():
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    mask = torch.zeros(300, 420, dtype=torch.bool)
    mask[40:200, 250:400] = True
    geometry = ResizeCrop(shorter=256, crop=(224, 224))
    ours = geometry.to_input(mask)
    reference = CenterCrop(224)(Resize(256, interpolation=InterpolationMode.NEAREST)(mask[None].float()))[0] > 0.5
    assert ours.shape == (224, 224)
    assert (ours == reference).float().mean() > 0.995  # nearest resampling may differ on a boundary row
    from multiexplain import zoo

    assert zoo.load_model("torchvision:resnet18@none").geometry == geometry


def test_video_and_caption_pairs(tmp_path):
    import av

    from multiexplain.data import make_action_clips, make_captioned_scenes

    clips = make_action_clips(2, seed=5)
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        with av.open(str(videos / f"clip_{i}.mp4"), mode="w") as container:
            stream = container.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
            for t in range(16):
                frame = (clips.clips[i, :, t].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    video = explain_dataset("video", "builtin:action-c3d", videos, tmp_path / "video-store", progress=False)
    rows = MapStore(tmp_path / "video-store").index()
    assert video.explained == 2 and rows[0]["layer"] == "features" and rows[0]["target_label"]
    _, tensors = next(MapStore(tmp_path / "video-store").items())
    assert tensors["gradcam++/raw"].shape[0] == 8  # T' of the shipped C3D

    scenes = make_captioned_scenes(2, seed=4)
    folder = tmp_path / "caption-images"
    folder.mkdir()
    images, annotations = [], []
    for i in range(2):
        Image.fromarray((scenes.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png"})
        annotations += [{"id": 2 * i, "image_id": i, "caption": scenes.captions[i]},
                        {"id": 2 * i + 1, "image_id": i, "caption": scenes.captions[1 - i]}]
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": images, "annotations": annotations}))
    captions = explain_dataset("captioning", "builtin:show-and-tell", coco, tmp_path / "caption-store", images=folder,
                               progress=False)
    assert captions.explained == 4  # every (image, caption) pair
    for row, tensors in MapStore(tmp_path / "caption-store").items():
        assert row["words"] == row["caption"].split()
        assert tensors["gradcam++/raw"].shape == (len(row["words"]), 16, 16)


def _write_mp4(path: Path, frames: torch.Tensor, fps: int = 8) -> None:
    """``frames`` (3, T, H, W) in [0, 1] as an MPEG-4 file written with PyAV."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[-1], frames.shape[-2], "yuv420p"
        for t in range(frames.shape[1]):
            array = (frames[:, t].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_whole_videos_window_by_window_from_the_command_line(tmp_path, capsys):
    """``explain-dataset --task video --window --stride 4 --upsample``: every window's maps equal
    ``explain_clip`` on the same decoded frames, the per-frame maps are those windows blended with
    :class:`WindowBlend`, and a video shorter than a window is padded with a warning, not dropped."""
    from multiexplain.adapters.video import WindowBlend, explain_clip, window_starts
    from multiexplain.data import make_action_clips
    from multiexplain.io import VideoReader
    from multiexplain.models import load_action_c3d

    clips = make_action_clips(3, seed=5)
    folder = tmp_path / "videos"
    folder.mkdir()
    _write_mp4(folder / "a_long.mp4", torch.cat([clips.clips[0], clips.clips[1][:, :8]], dim=1))  # 24 frames
    _write_mp4(folder / "b_short.mp4", clips.clips[2][:, :10])  # fewer frames than a window
    out = tmp_path / "store"
    code = cli.main(["explain-dataset", "--task", "video", "--model", "builtin:action-c3d", "--data", str(folder),
                     "--out", str(out), "--window", "--stride", "4", "--upsample", "--dtype", "float32",
                     "--batch-size", "2", "--device", "cpu", "--quiet"])
    printed = capsys.readouterr()
    assert code == 0 and "explained 2 of 2 items" in printed.out
    # The padded video is explained, and the padding is said: on stderr, in its row and in metrics.json.
    assert "warning: " + str(folder / "b_short.mp4") in printed.err
    assert [w["path"] for w in json.loads((out / "metrics.json").read_text())["warnings"]] == [str(folder / "b_short.mp4")]
    model, names = load_action_c3d()
    stored = {Path(row["path"]).name: (row, tensors) for row, tensors in MapStore(out).items()}

    row, tensors = stored["a_long.mp4"]
    with VideoReader(folder / "a_long.mp4", size=64) as reader:
        video = torch.stack([frame for _, _, frame in reader.frames()], dim=1).float().div(255)
    starts = window_starts(24, 16, 4)
    assert starts == [0, 4, 8] and tensors["window_starts"].tolist() == starts
    assert row["frames"] == 24 and [w["start_frame"] for w in row["windows"]] == starts
    direct = explain_clip(model, torch.stack([video[:, s : s + 16] for s in starts]), methods=("gradcam++", "gradcam"))
    blend = WindowBlend()
    for k, start in enumerate(starts):
        assert row["windows"][k]["target"] == int(direct["gradcam++"].targets[k])
        assert row["windows"][k]["target_label"] == names[row["windows"][k]["target"]]
        blend.add(start, direct["gradcam++"].maps[k])
    for method in ("gradcam++", "gradcam"):
        torch.testing.assert_close(tensors[f"{method}/window_raw"], direct[method].raw, atol=1e-5, rtol=1e-4)
    blended = torch.stack([m for _, m in blend.pop()])
    assert tensors["gradcam++/maps"].shape == (24, 64, 64)
    torch.testing.assert_close(tensors["gradcam++/maps"], blended, atol=1e-5, rtol=1e-4)

    row, tensors = stored["b_short.mp4"]
    assert row["warnings"] and row["frames"] == 16 and tensors["window_starts"].tolist() == [0]
    assert tensors["gradcam++/window_raw"].shape == (1, 8, 8, 8) and tensors["gradcam++/maps"].shape == (16, 64, 64)

    with pytest.raises(ValueError, match="stride needs window"):
        explain_dataset("video", "builtin:action-c3d", folder, tmp_path / "bad", stride=4, progress=False)
