"""Scale-out: synthesize() under torchrun with 2 CPU processes on gloo equals a single-process run."""
import json
import os
import subprocess
import sys

import torch

import zsqfast

from ._shapes import tiny_bn_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_two_processes_equal_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "_dist_synthesis.py"), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "DISTRIBUTED-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("plain", "centers"):
        d = tmp_path / name
        index = json.loads((d / "index.json").read_text())
        assert sorted(index["batches"]) == ["0", "1", "2", "3"]       # one merged index
        assert not list(d.glob("shard_*.json")) and not list(d.glob("*.tmp"))
    # the stored set also equals a run in this process (another thread count: equal up to rounding)
    here = zsqfast.synthesize(tiny_bn_model(), 14, batch_size=4, iterations=5, seed=7, progress=False,
                              input_shape=(3, 8, 8))
    stored = zsqfast.SyntheticDataset.load(tmp_path / "plain")
    assert torch.equal(stored.labels, here.labels)
    assert torch.allclose(stored.images, here.images, atol=1e-4)
