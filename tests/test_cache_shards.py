"""The teacher cache written by several processes: 2 processes (torchrun, gloo), each writing its own fixed
partition of shards, produce the same files byte for byte as 1 process, and the merged cache reads back row by
row the same whatever process count wrote it."""

from __future__ import annotations

import os
import sys

import torch

from aetheris.teacher_cache import CacheStream, read_meta

from conftest import ROOT, run_process_group
sys.path.insert(0, str(ROOT / "tests"))
from dist_driver import CACHE_ARGS, write_test_cache  # noqa: E402


def test_two_processes_write_the_same_cache_as_one(teacher_dir, tmp_path):
    one = tmp_path / "one"
    write_test_cache(str(teacher_dir), str(one))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    two = tmp_path / "two"
    proc = run_process_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(ROOT / "tests" / "dist_driver.py"), str(two), "--cache-from", str(teacher_dir)], env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # 10 rows in shards of 3: four shard files, two written by each process
    meta = read_meta(two)
    assert [s["rows"] for s in meta["shards"]] == [3, 3, 3, 1] and meta["rows"] == CACHE_ARGS["rows"]
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir())
    assert {"cache.json", "heldout.safetensors", "shard-00003.safetensors"} <= set(files)
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary folder was renamed into place
    # Read back: the rows come out in stream order (across shard boundaries, cycling after the last row).
    a, b = CacheStream(one), CacheStream(two)
    for n in (4, 4, 5):
        x, y = a.next_batch(n), b.next_batch(n)
        for key in x:
            assert torch.equal(torch.as_tensor(x[key]), torch.as_tensor(y[key])), key
