"""Centering and Sinkhorn-Knopp see the global batch: a batch split over 2 gloo processes gives the same centres
and teacher targets as one process holding the whole batch (REFERENCE.md §1.5, DESIGN.md "Distributed")."""
import datetime, os, tempfile, time
import pytest, torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ultradino_lab.losses import DINOLoss, iBOTPatchLoss, sinkhorn_knopp_teacher, teacher_targets

K, STEPS, TEMP = 7, 3, 0.05
CLS_SPLIT = (4, 4)      # 2B teacher CLS logits per process (equal batch per process, as in training)
PATCH_SPLIT = (6, 3)    # masked tokens per process differ


def _data():
    g = torch.Generator().manual_seed(0)
    cls = [torch.randn(sum(CLS_SPLIT), K, generator=g) for _ in range(STEPS)]
    patches = [torch.randn(sum(PATCH_SPLIT), K, generator=g) + i for i in range(STEPS)]
    return cls, patches


def _run(cls, patches, centering):
    "Targets and centres of every step, with whatever process group is (or is not) initialised."
    dl, il = DINOLoss(K), iBOTPatchLoss(K)
    out = []
    for c, p in zip(cls, patches):
        td, ti = teacher_targets(c, TEMP, dl, centering, p, il, n_masked_patches_tensor=torch.tensor([p.shape[0]]))
        dl.apply_center_update(); il.apply_center_update()
        out.append(dict(td=td, ti=ti, dc=dl.center.clone(), ic=il.center.clone()))
    return out


def _slice(x, split, rank):
    start = sum(split[:rank])
    return x[start:start + split[rank]]


def _worker(rank, world, init_file, expected):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cls, patches = _data()
        cls = [_slice(c, CLS_SPLIT, rank) for c in cls]
        patches = [_slice(p, PATCH_SPLIT, rank) for p in patches]
        for centering in ('centering', 'sinkhorn_knopp'):
            for got, exp in zip(_run(cls, patches, centering), expected[centering]):
                torch.testing.assert_close(got['td'], _slice(exp['td'], CLS_SPLIT, rank), atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(got['ti'], _slice(exp['ti'], PATCH_SPLIT, rank), atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(got['dc'], exp['dc'], atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(got['ic'], exp['ic'], atol=1e-6, rtol=1e-5)
        # the iBOT form without a count uses this process's rows, all-reduced
        p = patches[0]
        torch.testing.assert_close(iBOTPatchLoss(K).sinkhorn_knopp_teacher(p, TEMP),
                                   _slice(expected['sk_ibot_full'], PATCH_SPLIT, rank), atol=1e-6, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def test_split_batch_equals_full_batch():
    cls, patches = _data()
    expected = {c: _run(cls, patches, c) for c in ('centering', 'sinkhorn_knopp')}   # no process group here
    expected['sk_ibot_full'] = sinkhorn_knopp_teacher(patches[0], TEMP)
    # sanity of the single-process expectations themselves
    torch.testing.assert_close(expected['centering'][0]['dc'], 0.1 * cls[0].mean(0, keepdim=True))
    torch.testing.assert_close(expected['centering'][0]['ic'], 0.1 * patches[0].mean(0).reshape(1, 1, K))
    assert torch.count_nonzero(expected['sinkhorn_knopp'][-1]['dc']) == 0   # SK leaves the centres alone
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, 'pg_init')
        ctx = mp.spawn(_worker, args=(2, init_file, expected), nprocs=2, join=False)
        deadline = time.monotonic() + 120
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive(): p.kill()
                pytest.fail('2-process gloo test did not finish in 120 s')
