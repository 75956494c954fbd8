"""The pipeline under torchrun: 2 CPU processes on gloo (tests/_ddp_worker.py; the zsqfast command line)."""
import os
import subprocess
import sys

import torch

from ._threads import num_threads

HERE = os.path.dirname(os.path.abspath(__file__))


# --standalone: torchrun picks a free port itself (no bind-close-rebind race)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2"]


def _launch(*target, timeout=180, fails=False) -> subprocess.CompletedProcess:
    """torchrun 2 processes (1 thread each) of ``target`` (a script and its arguments, or -m module ...)."""
    r = subprocess.run([*TORCHRUN, *map(str, target)], capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if fails:
        assert r.returncode != 0
    else:
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


def _torchrun(out, *args, timeout=180, fails=False):
    """Run tests/_ddp_worker.py OUT ARGS... as 2 processes; the two ranks' results (``fails``: its output)."""
    r = _launch(os.path.join(HERE, "_ddp_worker.py"), out, *args, timeout=timeout, fails=fails)
    if fails:
        return r.stdout + r.stderr
    return [torch.load(out / f"rank{i}.pt", weights_only=True) for i in range(2)]


def test_torchrun_two_processes_gloo(tmp_path):
    a, b = _torchrun(tmp_path, "synq")
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


def test_torchrun_quantize_synthesizes_across_ranks(tmp_path):
    """Without ``data=`` every rank takes its share of the synthesis batches; the set every rank then
    fine-tunes on equals a one-process synthesize() with the same settings."""
    import zsqfast

    from ._tiny import SYNTH_BUDGET as SYNTH, tiny_model

    a, b = _torchrun(tmp_path, "kd", "synthesize")
    assert a["world"] == b["world"] == 2
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    with num_threads(1):  # the workers' thread count: the same arithmetic
        ref = zsqfast.synthesize(tiny_model(), SYNTH["num_images"], batch_size=SYNTH["synth_batch_size"],
                                 iterations=SYNTH["synth_iterations"], seed=0, progress=False)
    for r in (a, b):
        assert torch.equal(r["synthetic"][0], ref.images) and torch.equal(r["synthetic"][1], ref.labels)
    shards = sorted(p.name for p in (tmp_path / "synthetic").glob("shard_*.pt"))
    assert len(shards) == 4, shards


def test_torchrun_cli_synthesize_splits_batches(tmp_path):
    """``torchrun -m zsqfast.cli synthesize``: the ranks share the batches; the set equals one process's."""
    import zsqfast
    from zsqfast.cli import main
    from zsqfast.models import cifar_resnet

    torch.manual_seed(0)
    torch.save(cifar_resnet(8).state_dict(), tmp_path / "r8.pth")
    args = ["synthesize", "--model", "cifar_resnet8", "--checkpoint", str(tmp_path / "r8.pth"), "--num-images", "32",
            "--iterations", "2", "--batch-size", "8", "--quiet", "--out"]
    r = _launch("-m", "zsqfast.cli", *args, tmp_path / "two")
    assert r.stdout.count("32 synthetic images") == 1  # rank 0 reports
    with num_threads(1):
        assert main([*args, str(tmp_path / "one")]) == 0
    two, one = (zsqfast.SyntheticDataset.load(tmp_path / d) for d in ("two", "one"))
    assert torch.equal(two.images, one.images) and torch.equal(two.labels, one.labels)


def test_ddp_resume_when_one_rank_missed_the_last_checkpoint(tmp_path):
    """Killed between the ranks' epoch-end writes, rank 1 is an epoch behind rank 0: on resume both go back
    to the epoch they share (rank 0 from the previous checkpoint it kept) and end as an uninterrupted run."""
    ref = _torchrun(tmp_path / "ref", "finetune-only", "all")
    run = tmp_path / "run"
    _torchrun(run, "finetune-only", "1")
    _torchrun(run, "finetune-only", "1")  # both ranks at epoch 2, each keeping epoch 1 as the previous one
    r1 = run / "ft_rank1"
    (r1 / "checkpoint_prev.pt").replace(r1 / "checkpoint.pt")  # rank 1 "died" before writing epoch 2
    assert torch.load(r1 / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert torch.load(run / "ft" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    res = _torchrun(run, "finetune-only", "all", timeout=120)  # before: the ranks' step counts differ -> hang
    for a, b in zip(ref, res):
        assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert torch.load(run / "ft" / "checkpoint.pt", weights_only=True)["epoch"] == 3
    # one rank's checkpoint of another run (here: another seed): every rank raises, not that rank alone
    state = torch.load(r1 / "checkpoint.pt", weights_only=True)
    torch.save(dict(state, seed=state["seed"] + 1), r1 / "checkpoint.pt")
    out = _torchrun(run, "finetune-only", "all", timeout=120, fails=True)
    assert out.count("ValueError: ") >= 2 and "belongs to a different run" in out, out[-3000:]


def test_ddp_refuses_a_one_process_checkpoint(tmp_path):
    """A fine-tuning checkpoint of one process (here as earlier versions wrote it: no world_size, weights
    without "module.") is not silently restarted from scratch by 2 ranks, overwriting it: every rank raises,
    naming the number of processes."""
    import zsqfast

    from ._tiny import tiny_images, tiny_model
    from .test_finetune import _earlier_checkpoint

    fp = tiny_model()
    images, labels = tiny_images(32)
    with num_threads(1):  # tests/_ddp_worker.py finetune_only's run, in one process
        zsqfast.finetune(fp, zsqfast.quantize_model(fp, 4, 4), (images, labels), method="kd", epochs=3, batch_size=8,
                         out=tmp_path / "ft", stop_after=1, lr=1e-3, calib_batches=1, progress=False)
    _earlier_checkpoint(tmp_path / "ft" / "checkpoint.pt")
    out = _torchrun(tmp_path, "finetune-only", "all", timeout=120, fails=True)
    assert out.count("ValueError: ") >= 2 and "world_size: 1 there, 2 now" in out, out[-3000:]
    assert torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)["epoch"] == 1  # left as it was
