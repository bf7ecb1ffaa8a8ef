"""Offline teacher cache for stage 2: run the teacher once over a fixed sequence of training rows, keep per
position its top-k log-probs (+ token ids + tail log-mass), and train later from the cache without the teacher.

    write_cache(teacher, stream, folder, rows=..., k=64, temperature=1.0)  -> shards in folder
    CacheStream(folder).next_batch(n)  -> input_ids, labels, doc_ids, lang_ids, t_values, t_ids, t_tail
    losses.cached_distill_loss(t_values, t_ids, t_tail, student_logits, labels, temperature)

Files: ``cache.json`` (k, temperature, vocab_size, rows, shard list, the tokenizer's vocab hash) and
``shard-00000.safetensors``, … each holding ``shard_rows`` rows: ``input_ids``/``labels``/``doc_ids``/
``lang_ids`` (int64, (R, T)), ``t_values`` (float16, (R, T, k)), ``t_ids`` (int32, (R, T, k)), ``t_tail``
(float32, (R, T)). At Tiny Aya scale with k = 64 one position costs 64·(2 + 4) + 4 = 388 bytes instead of
1 MiB of fp32 logits. The KL against a cache is the documented top-k approximation (``losses.topk_kl``):
a lower bound of the full KL, equal to it at k = V.

Status: the cache writer, reader and loss are built and tested; ``aetheris distill`` does not use a cache yet
(stage 2 runs the teacher online).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from aetheris.losses import topk_teacher


@torch.no_grad()
def write_cache(teacher, stream, folder: str | Path, *, rows: int, k: int = 64, temperature: float = 1.0,
                batch_size: int = 8, shard_rows: int = 1024, tokenizer_hash: str | None = None) -> Path:
    """Draw ``rows`` rows from ``stream`` (``next_batch``) and store them with the teacher's top-k."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = next(teacher.parameters()).device
    shards, pending, done = [], [], 0

    def flush():
        if not pending:
            return
        blob = {key: torch.cat([p[key] for p in pending]) for key in pending[0]}
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(blob, str(folder / name))
        shards.append({"file": name, "rows": int(blob["input_ids"].shape[0])})
        pending.clear()

    while done < rows:
        n = min(batch_size, rows - done, shard_rows - sum(int(p["input_ids"].shape[0]) for p in pending))
        batch = {key: torch.as_tensor(v) for key, v in stream.next_batch(n).items()}
        logits = teacher(input_ids=batch["input_ids"].to(device)).logits
        values, ids, tail = topk_teacher(logits, k, temperature)
        pending.append({**{key: v.contiguous() for key, v in batch.items()}, "t_values": values.half().cpu(),
                        "t_ids": ids.int().cpu(), "t_tail": tail.float().cpu()})
        done += n
        if sum(int(p["input_ids"].shape[0]) for p in pending) >= shard_rows:
            flush()
    flush()
    meta = {"k": min(k, int(logits.shape[-1])), "temperature": temperature, "vocab_size": int(logits.shape[-1]),
            "rows": rows, "shards": shards, "tokenizer_hash": tokenizer_hash}
    (folder / "cache.json").write_text(json.dumps(meta, indent=1))
    return folder


class CacheStream:
    """Rows of a teacher cache in order, cycling; resumable (``state_dict`` = the row position)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "cache.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} is missing: {self.folder} is not a teacher cache (write one with "
                                    "teacher_cache.write_cache)")
        self.meta = json.loads(meta_path.read_text())
        self.position = 0
        self._shard_index, self._shard = -1, None

    def _row(self, i: int) -> dict[str, np.ndarray]:
        i %= self.meta["rows"]
        start = 0
        for index, shard in enumerate(self.meta["shards"]):
            if i < start + shard["rows"]:
                if index != self._shard_index:
                    self._shard, self._shard_index = load_file(str(self.folder / shard["file"])), index
                return {key: v[i - start].float().numpy() if v.dtype == torch.float16 else v[i - start].numpy()
                        for key, v in self._shard.items()}
            start += shard["rows"]
        raise IndexError(i)

    def next_batch(self, n: int) -> dict[str, np.ndarray]:
        rows = [self._row(self.position + j) for j in range(n)]
        self.position += n
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
