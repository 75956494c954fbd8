"""Data-parallel fine-tuning: 2 CPU processes on gloo launched with torchrun (tests/_ddp_worker.py)."""
import os
import socket
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_gloo(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), os.path.join(HERE, "_ddp_worker.py"), str(tmp_path), "synq"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a["world"] == b["world"] == 2
    # each rank trained on its own half of the data: identical weights only if gradients were all-reduced
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert any(not torch.equal(a["state"][k], a["rtn"][k]) for k in a["state"])  # and training moved them
    assert len(a["history"]) == 3 and "accuracy" in a["history"][-1]  # rank 0 evaluates and logs
    # rank 0's artifacts are the pipeline's; the saved model equals what every rank holds
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], a["state"][k]) for k in saved)
    assert (tmp_path / "finetune" / "log.jsonl").exists() and (tmp_path / "finetune_rank1" / "checkpoint.pt").exists()
    assert (tmp_path / "synthetic.pt").exists()  # the given set is kept with the run
