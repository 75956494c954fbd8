"""Run by tests/test_pipeline_ddp.py under ``python -m torch.distributed.run --nproc_per_node 2``: the
pipeline data-parallel on gloo, on a tiny BN-CNN: ``data="given"`` fine-tunes a tiny fixed "synthetic" set,
``data="synthesize"`` runs the whole pipeline, the ranks splitting the synthesis batches.
Writes ``<out>/rank<r>.pt``: the final state_dict, the rank-0 history and the set quantize() handed this
rank's fine-tuning."""
import sys

import torch

torch.set_num_threads(1)

import zsqfast  # noqa: E402
from _tiny import SYNTH_BUDGET, tiny_images, tiny_model  # noqa: E402  (tests/ is this script's directory)
from zsqfast import distributed as zdist  # noqa: E402


def main(out: str, method: str, data: str = "given") -> None:
    assert zdist.init_from_env(), "expected WORLD_SIZE > 1"
    fp = tiny_model()
    images, labels = tiny_images(32)
    kw = dict(data=(images, labels)) if data == "given" else dict(SYNTH_BUDGET)
    used = {}
    real_ddp = zdist.finetune_ddp

    def spy(fp_model, q_model, dataset, **k):  # the set this rank's fine-tuning gets from quantize()
        used["synthetic"] = (dataset.images.clone(), dataset.labels.clone())
        return real_ddp(fp_model, q_model, dataset, **k)
    zdist.finetune_ddp = spy
    res = zsqfast.quantize(fp, 4, 4, method=method, epochs=3, batch_size=8, out=out,
                           eval_data=(images[:8], labels[:8]), progress=False,
                           finetune_options=dict(lr=1e-3, calib_batches=1), **kw)
    torch.save({"state": res.model.state_dict(), "rtn": res.rtn_model.state_dict(), "history": res.history,
                "world": zdist.world_size(), "synthetic": used["synthetic"]},
               f"{out}/rank{zdist.rank()}.pt")
    zdist.barrier()


def finetune_only(out: str, stop_after: str) -> None:
    """finetune_ddp() alone, 3 epochs into ``<out>/ft`` (``stop_after``: epochs this call, or "all")."""
    assert zdist.init_from_env(), "expected WORLD_SIZE > 1"
    fp = tiny_model()
    q = zsqfast.quantize_model(fp, 4, 4)
    images, labels = tiny_images(32)
    zdist.finetune_ddp(fp, q, (images, labels), method="kd", epochs=3, batch_size=8, out=f"{out}/ft",
                       stop_after=None if stop_after == "all" else int(stop_after), lr=1e-3, calib_batches=1,
                       progress=False)
    torch.save({"state": q.state_dict()}, f"{out}/rank{zdist.rank()}.pt")
    zdist.barrier()


if __name__ == "__main__":
    if sys.argv[2] == "finetune-only":
        finetune_only(sys.argv[1], sys.argv[3])
    else:
        main(*sys.argv[1:])
