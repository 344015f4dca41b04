"""A chunked store of explanations that other tools read without multiexplain.

Layout of a store folder::

    store.json                 the run's settings (task, model, methods, sizes); a resumed run must match
    chunk-000000.safetensors   the tensors of items 0..C-1: "<item>/<method>/raw", "<item>/<method>/maps", ...
    chunk-000000.jsonl         one JSON line per item of the chunk: key, path, targets, scores, metrics, status
    ...
    index.jsonl                every item once, in item order (written when all chunks are done)
    metrics.json               aggregated metrics (written by rank 0 at the end)

Why safetensors shards with a JSONL index: each chunk of items belongs to exactly one process,
which writes it to a temporary name and renames it into place, so processes never write the same
file (no locks) and a chunk either exists whole or not at all -- a killed run resumes at the first
chunk whose ``.safetensors`` file is missing, and a partially written chunk is never taken as
done. safetensors files hold plain tensors (no pickle: loading one runs no code), keep float16,
load lazily, and are read by ``safetensors`` in PyTorch, NumPy, JAX and TensorFlow; JSON lines are
read by anything (``pandas.read_json(path, lines=True)``). Variable map sizes (images of different
sizes, captions of different lengths) need no padding: every item has its own keys. Reading back::

    import json, safetensors.torch
    row = json.loads(open("store/index.jsonl").readline())
    maps = safetensors.torch.load_file(f"store/{row['file']}")[f"{row['item']}/gradcam++/raw"]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["STORE_FORMAT", "MapStore", "chunk_ranges", "stack_keys", "to_storage"]

STORE_FORMAT = "multiexplain.store/1"


def chunk_ranges(count: int, chunk_size: int) -> list[range]:
    """Items ``0..count-1`` in consecutive chunks of ``chunk_size`` (the last may be shorter)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [range(start, min(start + chunk_size, count)) for start in range(0, count, chunk_size)]


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class MapStore:
    """The store folder ``root`` (see the module docstring).

    Chunk ``c`` is owned by one process; :meth:`write_chunk` writes its JSON lines and then its
    tensors, each atomically, so the ``.safetensors`` file's existence is what marks it done.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    # -- settings ---------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "store.json"

    def open(self, settings: Mapping[str, Any], *, create: bool) -> dict[str, Any]:
        """Check (or, with ``create``, write) the run's settings. A store made with other
        settings is refused: resuming it would mix two runs."""
        wanted = {"format": STORE_FORMAT, **json.loads(json.dumps(dict(settings)))}
        if self.manifest_path.is_file():
            found = json.loads(self.manifest_path.read_text())
            differ = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            if differ:
                details = ", ".join(f"{k}: {found.get(k)!r} in the store, {wanted.get(k)!r} now" for k in differ[:4])
                raise ValueError(f"{self.root} holds a run with other settings ({details}); "
                                 "use another --out folder, or the same settings to resume it")
            return found
        if not create:
            raise FileNotFoundError(f"{self.root} is not a store (no store.json)")
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(self.manifest_path, json.dumps(wanted, indent=1).encode())
        return wanted

    # -- chunks -------------------------------------------------------------------------------
    def tensor_path(self, chunk: int) -> Path:
        return self.root / f"chunk-{chunk:06d}.safetensors"

    def rows_path(self, chunk: int) -> Path:
        return self.root / f"chunk-{chunk:06d}.jsonl"

    def is_done(self, chunk: int, rows: int | None = None) -> bool:
        """Whether chunk ``chunk`` is complete: both files present, the tensor file's header readable,
        and (given ``rows``) one JSON line per item. A damaged chunk counts as not done (it is redone)."""
        if not (self.tensor_path(chunk).is_file() and self.rows_path(chunk).is_file()):
            return False
        try:
            from safetensors import safe_open

            with safe_open(str(self.tensor_path(chunk)), framework="pt") as handle:
                handle.keys()
            found = self.rows(chunk)
        except Exception:  # noqa: BLE001 - any unreadable chunk is redone
            return False
        return rows is None or len(found) == rows

    def write_chunk(self, chunk: int, rows: Sequence[Mapping[str, Any]], tensors: Mapping[str, Tensor]) -> None:
        """Write one chunk: its rows (JSON-able dicts, one per item) and its tensors."""
        from safetensors.torch import save

        lines = "".join(json.dumps(dict(row), sort_keys=True) + "\n" for row in rows)
        _atomic_write_bytes(self.rows_path(chunk), lines.encode())
        contiguous = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
        # The tensors last: their file is the mark that the chunk is complete.
        _atomic_write_bytes(self.tensor_path(chunk), save(contiguous, metadata={"chunk": str(chunk)}))

    def rows(self, chunk: int) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.rows_path(chunk).read_text().splitlines() if line.strip()]

    def tensors(self, chunk: int) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.tensor_path(chunk)))

    def remove_partial_files(self) -> None:
        """Delete temporary files a killed run left behind (they are never read)."""
        for path in self.root.glob(".chunk-*.tmp"):
            path.unlink(missing_ok=True)

    # -- the index ------------------------------------------------------------------------------
    def write_index(self, chunks: Sequence[int]) -> Path:
        """``index.jsonl``: every item's row in item order (all ``chunks`` must be done)."""
        missing = [c for c in chunks if not self.is_done(c)]
        if missing:
            raise RuntimeError(f"chunks {missing[:5]} of {self.root} are not written yet")
        rows = [row for chunk in chunks for row in self.rows(chunk)]
        rows.sort(key=lambda row: row["item"])
        path = self.root / "index.jsonl"
        _atomic_write_bytes(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode())
        return path

    def index(self) -> list[dict[str, Any]]:
        path = self.root / "index.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def items(self) -> Iterator[tuple[dict[str, Any], dict[str, Tensor]]]:
        """Every item's row and its tensors (``{"<method>/raw": ..., ...}``), in item order."""
        cache: dict[str, dict[str, Tensor]] = {}
        for row in self.index():
            if row["file"] not in cache:
                from safetensors.torch import load_file

                cache = {row["file"]: load_file(str(self.root / row["file"]))}
            prefix = f"{row['item']}/"
            yield row, {k[len(prefix):]: v for k, v in cache[row["file"]].items() if k.startswith(prefix)}

    def write_json(self, name: str, payload: Mapping[str, Any]) -> Path:
        path = self.root / name
        _atomic_write_bytes(path, json.dumps(dict(payload), indent=1, default=float).encode())
        return path


def stack_keys(prefix: str, values: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
    """``{f"{prefix}/{name}": tensor}`` for the values that are not ``None``."""
    return {f"{prefix}/{name}": value for name, value in values.items() if value is not None}


def to_storage(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """A map as stored: detached, on the CPU, in ``dtype`` (float16 by default)."""
    return tensor.detach().to("cpu", dtype)
