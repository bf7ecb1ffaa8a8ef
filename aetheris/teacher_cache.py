"""Offline teacher cache for stage 2: run the teacher once over a fixed sequence of training rows, keep per
position its top-k log-probs (+ token ids + tail log-mass), and train later from the cache without the teacher.

    write_cache(teacher, stream, folder, rows=..., k=64, temperature=1.0, source={...}, heldout={lang: ids})
    check_cache(folder, source)  -> the metadata, or CacheMismatchError naming every setting that differs
    CacheStream(folder).next_batch(n)  -> input_ids, labels, doc_ids, lang_ids, t_values, t_ids, t_tail
    losses.chunked_topk_divergence(t_values, t_ids, t_tail, student_logits, mask, temperature)

``aetheris distill`` uses it through ``kl.cache`` (``distill.run_kl``): a folder that does not exist yet is
written first (the teacher runs once, then is dropped), an existing one is checked against the run config.

Files: ``cache.json`` (k, temperature, dtype, vocab_size, rows, shard list, ``source``: what the cache was
built from — teacher, tokenizer vocabulary hash, seq_len, data settings — checked on every use) and
``shard-00000.safetensors``, … each holding ``shard_rows`` rows: ``input_ids``/``labels``/``doc_ids``/
``lang_ids`` (int64, (R, T)), ``t_values`` (``dtype``, default float16, (R, T, k)), ``t_ids`` (int32,
(R, T, k)), ``t_tail`` (float32, (R, T)); optionally ``heldout.safetensors``: the held-out report rows
(``input_ids``, ``lang_index``) with the same teacher fields, so stage 2 can report held-out KL without the
teacher. At Tiny Aya scale with k = 64 one position costs 64·(2 + 4) + 4 = 388 bytes instead of 1 MiB of
fp32 logits. The KL against a cache is the documented top-k approximation (``losses.topk_kl``): a lower
bound of the full forward KL, equal to it at k = V (up to the storage dtype; float32 makes it exact).
The folder is written under a temporary name and renamed into place, so a killed write leaves no cache.
Under several processes each writes its own shards (a fixed partition of the rows) and process 0 publishes the
merged manifest; the files are the same bytes whatever the process count, and any process count reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from aetheris.checkpoint import write_safetensors
from aetheris.losses import topk_teacher
from aetheris.teacher import teacher_logits

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CacheMismatchError(ValueError):
    """A teacher cache built from other settings than the run that wants to use it."""


def vocab_hash(tokenizer) -> str:
    """sha256 of the tokenizer's token -> id table: one number that says "same token ids"."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def _teacher_fields(teacher, ids: torch.Tensor, k: int, temperature: float, dtype: torch.dtype,
                    doc_ids: torch.Tensor | None = None) -> dict:
    device = next(teacher.parameters()).device
    logits = teacher_logits(teacher, ids.to(device), doc_ids.to(device) if doc_ids is not None else None)
    values, t_ids, tail = topk_teacher(logits, k, temperature)
    return {"t_values": values.to(dtype).cpu(), "t_ids": t_ids.int().cpu(), "t_tail": tail.float().cpu()}


@torch.no_grad()
def write_cache(teacher, stream, folder: str | Path, *, rows: int, k: int = 64, temperature: float = 1.0,
                batch_size: int = 8, shard_rows: int = 1024, dtype: str = "float16", source: dict | None = None,
                heldout: dict[str, torch.Tensor] | None = None, tokenizer_hash: str | None = None, log=None,
                rank: int = 0, world: int = 1, barrier=None) -> Path:
    """Draw ``rows`` rows from ``stream`` (``next_batch``, in order) and store them with the teacher's top-k;
    ``heldout`` ({lang: (n, T) ids}, or {lang: {input_ids, doc_ids, ...}} for packed rows) is stored beside them;
    ``source`` records what the cache was built from. Packed documents are kept apart (``teacher.teacher_logits``).

    Several processes write one cache together: every one is called (``rank`` of ``world``, ``barrier`` a
    function that waits for all of them), each draws every row from its own copy of the stream but runs the
    teacher only on a fixed partition — shard ``i`` (rows ``i·shard_rows`` …) belongs to process ``i % world``
    — and writes those shard files. Batches never cross a shard boundary, so each file holds the same bytes
    whatever the process count; process 0 then merges the shard list into ``cache.json`` and renames the
    folder into place (the only step that publishes the cache), after a last barrier."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"cache dtype {dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}")
    if rows < 1:
        raise ValueError(f"a teacher cache needs rows >= 1 (got {rows})")
    barrier = barrier or (lambda: None)
    folder = Path(folder)
    # One temporary folder for all processes: its name must not depend on anything process-local.
    tmp = folder.parent / f".tmp-{folder.name}"
    if rank == 0:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed write
        tmp.mkdir()
    barrier()
    store = STORAGE_DTYPES[dtype]
    vocab = teacher.config.vocab_size if hasattr(teacher, "config") else None
    done, shard = 0, 0
    while done < rows:
        n_shard = min(shard_rows, rows - done)
        mine = shard % world == rank
        parts = []
        for start in range(0, n_shard, batch_size):
            n = min(batch_size, n_shard - start)
            batch = {key: torch.as_tensor(v) for key, v in stream.next_batch(n).items()}  # every process draws
            if mine:
                fields = _teacher_fields(teacher, batch["input_ids"], k, temperature, store, batch.get("doc_ids"))
                parts.append({**{key: v.contiguous() for key, v in batch.items()}, **fields})
        if mine:
            blob = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
            write_safetensors(blob, tmp / f"shard-{shard:05d}.safetensors")
            if log is not None:
                log(f"teacher cache: shard {shard} ({done + n_shard}/{rows} rows) written by process {rank}")
        done, shard = done + n_shard, shard + 1
    shards = [{"file": f"shard-{i:05d}.safetensors", "rows": min(shard_rows, rows - i * shard_rows)} for i in range(shard)]
    if rank == 0:
        vocab = vocab or int(load_file(str(tmp / shards[0]["file"]))["t_values"].shape[-1])
        meta = {"k": int(min(k, vocab)), "temperature": temperature, "dtype": dtype, "vocab_size": int(vocab),
                "rows": rows, "shards": shards, "tokenizer_hash": tokenizer_hash, "source": source or {}}
        if heldout:
            langs = sorted(heldout)
            heldout = {lang: v if isinstance(v, dict) else {"input_ids": v} for lang, v in heldout.items()}
            ids = torch.cat([heldout[lang]["input_ids"] for lang in langs])
            docs = torch.cat([heldout[lang].get("doc_ids", torch.zeros_like(heldout[lang]["input_ids"])) for lang in langs])
            index = torch.cat([torch.full((len(heldout[lang]["input_ids"]),), i, dtype=torch.long)
                               for i, lang in enumerate(langs)])
            parts = [_teacher_fields(teacher, ids[i:i + batch_size], k, temperature, store, docs[i:i + batch_size])
                     for i in range(0, len(ids), batch_size)]
            blob = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
            for key in ("labels", "doc_ids", "attention_mask"):  # what the held-out KL masks and separates by
                if all(key in heldout[lang] for lang in langs):
                    blob[key] = torch.cat([heldout[lang][key] for lang in langs]).long().contiguous()
            write_safetensors({"input_ids": ids.contiguous(), "lang_index": index, **blob}, tmp / "heldout.safetensors")
            meta["heldout_languages"] = langs
    barrier()  # every shard is on disk
    if rank == 0:
        missing = [s["file"] for s in shards if not (tmp / s["file"]).is_file()]
        if missing:
            raise RuntimeError(f"teacher cache {folder}: shard files {missing} were not written; is {folder.parent} "
                               "on a filesystem every process shares?")
        (tmp / "cache.json").write_text(json.dumps(meta, indent=1, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    barrier()  # the cache is published before anyone reads it
    return folder


def read_meta(folder: str | Path) -> dict:
    meta_path = Path(folder) / "cache.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: {folder} is not a teacher cache (stage 2 writes one when "
                                "kl.cache names a folder that does not exist yet)")
    return json.loads(meta_path.read_text())


def check_cache(folder: str | Path, expected: dict) -> dict:
    """The cache's metadata if it was built from ``expected`` (keys: k, temperature, dtype and ``source``
    fields); otherwise CacheMismatchError listing each differing setting, cache value vs run value."""
    meta = read_meta(folder)
    have = {**{key: meta.get(key) for key in ("k", "temperature", "dtype")}, **meta.get("source", {})}
    diffs = [f"{key}: cache {have.get(key)!r} != run {value!r}" for key, value in expected.items()
             if _normal(have.get(key)) != _normal(value)]
    if diffs:
        raise CacheMismatchError(f"the teacher cache {folder} was built from other settings than this run:\n  "
                                 + "\n  ".join(diffs) + "\nPoint kl.cache at a new folder (it is then written from "
                                 "this config), delete this one to rebuild it, or change the run config to match.")
    return meta


def _normal(value):
    """JSON round trip, so tuples/lists and ints/floats written and read compare equal."""
    return json.loads(json.dumps(value, default=str))


def load_heldout(folder: str | Path) -> dict[str, dict[str, torch.Tensor]] | None:
    """The cached held-out rows per language ({lang: {input_ids, t_values, t_ids, t_tail}, plus labels, doc_ids
    and attention_mask when they were given}), or None."""
    meta = read_meta(folder)
    path = Path(folder) / "heldout.safetensors"
    if not path.is_file():
        return None
    blob = load_file(str(path))
    out = {}
    for i, lang in enumerate(meta["heldout_languages"]):
        sel = blob["lang_index"] == i
        out[lang] = {key: v[sel] for key, v in blob.items() if key != "lang_index"}
    return out


class CacheStream:
    """Rows of a teacher cache in order, cycling; resumable (``state_dict`` = the row position)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.position = 0
        self._shard_index, self._shard = -1, None

    def _row(self, i: int) -> dict[str, np.ndarray]:
        i %= self.meta["rows"]
        start = 0
        for index, shard in enumerate(self.meta["shards"]):
            if i < start + shard["rows"]:
                if index != self._shard_index:
                    self._shard, self._shard_index = load_file(str(self.folder / shard["file"])), index
                return {key: (v[i - start].float() if v.dtype in (torch.float16, torch.bfloat16) else v[i - start]).numpy()
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
