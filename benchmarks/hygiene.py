"""Numbers behind the README's robustness table that the tests bound but do not record.

    python benchmarks/hygiene.py [--seeds 10] [--explanations 1000]

* Autocast: ``torch.autocast("cpu", dtype=torch.bfloat16)`` against float32 on the small CNN of
  ``tests/test_properties.py`` (one model and batch per seed): the largest and the mean absolute
  difference of the min-max normalised maps, per method, over ``--seeds`` seeds. The test's
  tolerance (``AUTOCAST_TOLERANCE``) is printed beside them.
* Memory: ``--explanations`` consecutive explanations of the small CNN of ``tests/test_leaks.py``
  after a warm-up, as that test runs them: growth of the resident set size, of Python allocations
  (tracemalloc) and of the number of live tensors, with the test's bounds beside them.

One run, one thread, on whatever machine it runs on (RSS growth is allocator noise and varies from
run to run). Writes ``benchmarks/results/hygiene.json`` and ``.md`` (whole files, every run).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import tracemalloc
from pathlib import Path

import torch

from multiexplain import GradCAM, GradCAMPlusPlus

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "hygiene"


def _test_module(name: str):
    """A test module of this repository (its models and bounds are the definitions measured here)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def autocast_differences(seeds: int) -> dict[str, dict[str, float]]:
    properties = _test_module("test_properties")
    worst: dict[str, dict[str, float]] = {}
    for name, explainer_class in (("gradcam++", GradCAMPlusPlus), ("gradcam", GradCAM)):
        largest, mean = 0.0, 0.0
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = properties.SmallCNN().eval()
            x = torch.randn(4, 3, 32, 32)
            reference = explainer_class(model, "features")(x, targets=[0, 1, 2, 3]).maps
            with torch.autocast("cpu", dtype=torch.bfloat16):
                mixed = explainer_class(model, "features")(x, targets=[0, 1, 2, 3]).maps
            difference = (mixed - reference).abs()
            largest, mean = max(largest, float(difference.max())), max(mean, float(difference.mean()))
        worst[name] = {"max_abs": largest, "largest_mean_abs": mean}
    return {"seeds": seeds, "methods": worst, "tolerance": dict(properties.AUTOCAST_TOLERANCE)}


def memory_growth(explanations: int) -> dict[str, float]:
    leaks = _test_module("test_leaks")
    torch.manual_seed(0)
    model = leaks.Net().eval()
    x = torch.randn(2, 3, 16, 16)
    explainer = GradCAMPlusPlus(model, "auto")
    for _ in range(50):
        explainer(x, targets=[[0, 1], [2, 3]])
    gc.collect()
    tensors_start, rss_start = leaks._live_tensors(), leaks._rss_mb()
    tracemalloc.start()
    snapshot_start = tracemalloc.take_snapshot()
    for i in range(explanations):
        explanation = explainer(x, targets=[[0, 1], [2, 3]] if i % 2 else None)
    gc.collect()
    snapshot_end = tracemalloc.take_snapshot()
    tracemalloc.stop()
    python_kb = sum(stat.size_diff for stat in snapshot_end.compare_to(snapshot_start, "filename")) / 1024
    rss_mb = leaks._rss_mb() - rss_start
    del explanation
    gc.collect()
    return {"explanations": explanations, "rss_growth_mb": rss_mb, "python_growth_kb": python_kb,
            "live_tensors_before": tensors_start, "live_tensors_after": leaks._live_tensors(),
            "rss_bound_mb": leaks.RSS_BOUND_MB, "python_bound_kb": leaks.TRACEMALLOC_BOUND_KB}


def render(results: dict) -> str:
    autocast, memory = results["autocast"], results["memory"]
    tolerance = autocast["tolerance"]
    lines = [
        "# Hygiene: autocast precision and memory over many explanations",
        "",
        f"Autocast bfloat16 vs float32, small CNN of tests/test_properties.py, {autocast['seeds']} seeds, normalised maps:",
        "",
        "| method | largest abs. difference | largest mean abs. difference |",
        "|---|---|---|",
    ]
    for name, row in autocast["methods"].items():
        lines.append(f"| {name} | {row['max_abs']:.4f} | {row['largest_mean_abs']:.4f} |")
    lines += [
        "",
        f"The test's tolerance: {tolerance['max_abs']} max, {tolerance['mean_abs']} mean.",
        "",
        f"{memory['explanations']} explanations of the small CNN of tests/test_leaks.py after a warm-up "
        "(one run, one thread; RSS growth is allocator noise):",
        "",
        "| measure | growth | the test's bound |",
        "|---|---|---|",
        f"| resident set size | {memory['rss_growth_mb']:+.2f} MB | {memory['rss_bound_mb']} MB |",
        f"| Python allocations (tracemalloc) | {memory['python_growth_kb']:+.1f} KB | {memory['python_bound_kb']} KB |",
        f"| live tensors | {memory['live_tensors_before']} -> {memory['live_tensors_after']} | no growth |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--explanations", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"autocast": autocast_differences(args.seeds), "memory": memory_growth(args.explanations),
               "environment": {"torch": torch.__version__, "python": platform.python_version(), "threads": 1}}
    markdown = render(results)
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown + "\n")


if __name__ == "__main__":
    main()
