"""On-disk synthetic sets: one shard per batch plus an index, every write atomic (temp file + rename).

Layout of ``out/``::

    index.json          {"meta": {...}, "batches": {"0": {"final_loss": ..., "file": "shard_00000.pt"}, ...}}
    shard_00000.pt      {"images": float32 (B, C, H, W), "labels": int64 (B,)}
    shard_00000.json    the batch's index entry, written by a worker of a multi-process run (one writer
                        per file) until the coordinator merges the entries into index.json and removes them
    centers.pt          calibration centers, when the run uses them

A batch counts as done only once its shard *and* an index entry naming it (in index.json or a sidecar) are
both on disk, so an interrupted run loses at most the batch in progress and never leaves a half-written file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .._fileio import atomic_write_bytes


class ShardStore:
    """The shards and index of one synthesis run in directory ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.index_path = self.root / "index.json"

    def load_index(self) -> dict | None:
        if not self.index_path.exists():
            return None
        with open(self.index_path) as f:
            return json.load(f)

    def open(self, meta: dict, legacy: dict[str, dict] | None = None) -> dict:
        """The index for a run described by ``meta``: the existing one when it matches (resume), a new one when
        there is none. A directory holding a different run raises ValueError saying what differs.

        ``legacy``: per key of ``meta`` holding a dict (e.g. "hyperparameters"), the values of entries added
        after runs were first stored that reproduce those runs; a stored dict lacking such an entry matches
        when it is requested at that value."""
        index = self.load_index()
        if index is None:
            index = {"meta": meta, "batches": {}}
            self._write_index(index)
            return index
        stored = dict(index["meta"])
        for k, old in (legacy or {}).items():
            if isinstance(stored.get(k), dict):
                stored[k] = {**old, **stored[k]}
        diff = {k: (stored.get(k), v) for k, v in meta.items() if stored.get(k) != v}
        if diff:
            details = "; ".join(f"{k}: stored {a!r}, requested {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{self.root} holds a different synthesis run ({details}); use another output "
                             "directory or delete this one")
        return index

    def _sidecars(self) -> dict[str, dict]:
        out = {}
        for p in sorted(self.root.glob("shard_*.json")):
            with open(p) as f:
                out[str(int(p.stem[len("shard_"):]))] = json.load(f)
        return out

    def entries(self, index: dict) -> dict[str, dict]:
        """Index entries of the batches done: index.json's plus the workers' sidecars, shard present."""
        merged = dict(index["batches"], **self._sidecars())
        return {b: e for b, e in merged.items() if (self.root / e["file"]).exists()}

    def done(self, index: dict) -> set[int]:
        """Batches whose shard and index entry are both present."""
        return {int(b) for b in self.entries(index)}

    def save_batch(self, index: dict, b: int, images: torch.Tensor, labels: torch.Tensor, final_loss: float,
                   *, sidecar: bool = False) -> None:
        """Write batch b's shard, then its entry: into index.json, or (``sidecar``, a worker of a multi-process
        run) into its own ``shard_<b>.json`` for the coordinator's :meth:`merge`."""
        name = f"shard_{b:05d}.pt"
        payload = {"images": images.detach().cpu().contiguous(), "labels": labels.detach().cpu()}
        atomic_write_bytes(self.root / name, lambda f: torch.save(payload, f))
        entry = {"file": name, "final_loss": final_loss}
        if sidecar:
            atomic_write_bytes(self.root / f"shard_{b:05d}.json", lambda f: f.write(json.dumps(entry).encode()))
            return
        index["batches"][str(b)] = entry
        self._write_index(index)

    def merge(self, index: dict) -> dict:
        """Fold the sidecar entries into index.json (atomically), then remove them; returns the index."""
        index["batches"] = self.entries(index)
        self._write_index(index)
        for p in self.root.glob("shard_*.json"):
            p.unlink()
        return index

    def load_batch(self, index: dict, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        payload = torch.load(self.root / self.entries(index)[str(b)]["file"], map_location="cpu", weights_only=True)
        return payload["images"], payload["labels"]

    def save_tensor(self, name: str, t: torch.Tensor) -> None:
        atomic_write_bytes(self.root / name, lambda f: torch.save(t.detach().cpu().contiguous(), f))

    def load_tensor(self, name: str) -> torch.Tensor | None:
        p = self.root / name
        return torch.load(p, map_location="cpu", weights_only=True) if p.exists() else None

    def _write_index(self, index: dict) -> None:
        atomic_write_bytes(self.index_path, lambda f: f.write(json.dumps(index, indent=1, sort_keys=True).encode()))
