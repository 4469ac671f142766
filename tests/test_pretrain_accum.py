"""Gradient accumulation (issue 3, "Done when"): in the whole `pretrain` loop, 2 micro-batches of B/2 with
`train.accum_iter=2` match one batch of B — losses and parameters after 3 steps — and the schedules, EMA and
centres advance once per optimiser step (same lr, same iteration count, same data-stream position in images).

The step-level check with iBOT masks is in nbs/12_meta_arch.ipynb (`split_batch` of the same collated batch). Here,
as for DDP, KoLeo (nearest neighbours within each micro-batch, per process in the reference) and drop path
(random per sample) are off, and there are no iBOT masks: masks are drawn per micro-batch (stratified over it, as
in the reference's collate), so B/2-image micro-batches cannot carry the masks of the B-image batch."""
import pytest, torch

SAME = ['model.drop_path_rate=0', 'dino.koleo_loss_weight=0', 'optim.freeze_last_layer_epochs=0', 'data.splits=null',
        'train.precision=fp32', 'train.num_workers=0', 'ibot.mask_sample_probability=0', 'ibot.loss_weight=0']


pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py


def test_accumulation_equals_one_batch(tmp_path):
    from ultradino_lab.adapters import manifest_from_shared
    from ultradino_lab.pretrain import pretrain, read_metrics
    hc18 = manifest_from_shared('hc18')
    one = pretrain('smoke', tmp_path/'b4', manifest=hc18, progress=False, stop_at_iteration=3,
                   overrides=SAME + ['train.batch_size_per_gpu=4', 'train.accum_iter=1'])
    acc = pretrain('smoke', tmp_path/'b2x2', manifest=hc18, progress=False, stop_at_iteration=3,
                   overrides=SAME + ['train.batch_size_per_gpu=2', 'train.accum_iter=2'])
    assert one.config.derived.lr == acc.config.derived.lr and one.config.derived.effective_batch_size == 4
    m1, m2 = read_metrics(one.run_dir), read_metrics(acc.run_dir)
    assert m1['iteration'].tolist() == m2['iteration'].tolist() == [1, 2, 3]
    for k in ('dino_local_crops_loss', 'dino_global_crops_loss', 'total_loss', 'lr', 'mom', 'teacher_temp'):
        torch.testing.assert_close(torch.tensor(m2[k].values), torch.tensor(m1[k].values), atol=1e-5, rtol=1e-4, msg=k)
    a = torch.load(one.checkpoint, weights_only=True)
    b = torch.load(acc.checkpoint, weights_only=True)
    assert a['sampler'] == {'micro_batch': 3, 'pass': 0, 'offset': 12}
    assert b['sampler'] == {'micro_batch': 6, 'pass': 0, 'offset': 12}     # 2 micro-batches per step, same images
    assert a['optimizer']['state'][0]['step'] == b['optimizer']['state'][0]['step'] == 3   # one AdamW step per iteration
    for k, v in a['model'].items():
        torch.testing.assert_close(b['model'][k], v, atol=1e-5, rtol=1e-4, msg=k)
    assert a['model']['dino_loss.center'].abs().sum() > 0
