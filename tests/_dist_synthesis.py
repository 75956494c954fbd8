"""Run under torchrun (2 CPU processes, gloo) by test_distributed.py: a synthesis split over the ranks must equal
a single-process run with the same seed, in this very process (same thread count)."""
import contextlib
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import zsqfast  # noqa: E402
from tests._shapes import tiny_bn_model  # noqa: E402
from zsqfast.synthesis import engine  # noqa: E402


@contextlib.contextmanager
def patched(owner, name, make):
    """``owner.name`` replaced by ``make(original)`` for the block."""
    real = getattr(owner, name)
    setattr(owner, name, make(real))
    try:
        yield
    finally:
        setattr(owner, name, real)


def rank1_first(out, rank):
    """Rank 0 makes its calibration centers only once rank 1 has started a batch: rank 1 must not wait for
    rank 0's centers (it makes them itself); before, it sat in a barrier until they were stored."""
    flag = os.path.join(out, "rank1-started")

    def centers(real):
        def wait_then_make(*a, **k):
            deadline = time.monotonic() + 30
            while not os.path.exists(flag):
                assert time.monotonic() < deadline, "rank 1 waited for rank 0's calibration centers"
                time.sleep(0.05)
            return real(*a, **k)
        return wait_then_make

    def batch(real):
        def flag_then_run(*a, **k):
            open(flag, "w").close()
            return real(*a, **k)
        return flag_then_run
    return patched(engine, "make_centers", centers) if rank == 0 else patched(engine, "_synthesize_batch", batch)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    model = tiny_bn_model()
    for name, extra in (("plain", {}), ("centers", dict(calibration_centers=True, center_iterations=5))):
        kw = dict(batch_size=4, iterations=5, seed=7, progress=False, input_shape=(3, 8, 8), **extra)
        with rank1_first(out, rank) if extra else contextlib.nullcontext():
            ds = zsqfast.synthesize(model, 14, out=os.path.join(out, name), **kw)   # 4 batches over 2 ranks
        assert sorted(ds.meta["batches"]) == [0, 1, 2, 3], ds.meta["batches"]
        assert ds.meta["computed"] == [b for b in range(4) if b % 2 == rank], ds.meta["computed"]  # its own only
        ref = zsqfast.synthesize(model, 14, distributed=False, **kw)
        assert torch.equal(ds.images, ref.images) and torch.equal(ds.labels, ref.labels), name
        assert ds.meta["final_losses"] == ref.meta["final_losses"], name
    try:  # a rank asking for another run in the same directory fails on every rank instead of hanging
        zsqfast.synthesize(model, 14, out=os.path.join(out, "plain"), batch_size=4, iterations=5, seed=7 + rank,
                           progress=False, input_shape=(3, 8, 8))
        raise AssertionError("a mismatching run was accepted")
    except ValueError as e:
        assert "rank 1" in str(e) and "seed" in str(e), e

    def diverge_on_rank1(step):  # batch 1 (rank 1's first) gets a non-finite loss at its 3rd iteration
        def maybe_fail(self, it=0):
            if self.b == 1 and it == 2:
                raise FloatingPointError(f"synthesis loss became nan at batch {self.b}, iteration {it}; lower lr")
            return step(self, it)
        return maybe_fail
    with patched(engine._Batch, "step", diverge_on_rank1):
        try:  # every rank raises it (rank 0 after its own batches), none waits for rank 1 at a barrier
            zsqfast.synthesize(model, 14, out=os.path.join(out, "diverge"), batch_size=4, iterations=5, seed=7,
                               progress=False, input_shape=(3, 8, 8))
            raise AssertionError("the non-finite loss was not reported")
        except FloatingPointError as e:
            assert "rank 1" in str(e) and "batch 1" in str(e), e
    stored = sorted(p for p in os.listdir(os.path.join(out, "diverge")) if p.startswith("shard_") and p.endswith(".pt"))
    assert stored == ["shard_00000.pt", "shard_00002.pt"], stored  # rank 0's batches are kept for a resume
    dist.barrier()
    if rank == 0:
        print("DISTRIBUTED-OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Leave without running C++ static destructors: with torch 2.14's gloo backend a rank occasionally aborts
    # in teardown ("terminate called without an active exception") AFTER every check above passed and the
    # process group was destroyed, which would fail the run for a reason that is not ours.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
