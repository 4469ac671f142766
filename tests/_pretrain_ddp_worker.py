"""Run by tests/test_pretrain_ddp.py under `torchrun --nproc_per_node 2` (gloo, CPU).

1. Step level, iBOT and masks on: before the process group exists, every rank computes the single-process
   reference (3 `train_step`s on full batches of B=4 images); then, with the group, each rank takes its half of each
   batch (`split_batch`), the student is DDP-wrapped, and losses (mean over ranks), parameters and centres must match.
2. Loop level: `pretrain` with per-rank batch 2 into the run folder given on the command line; the test compares it
   with a one-process run with batch 4.
KoLeo is per process in the reference (nearest neighbours within the process's batch) and drop path is random per
sample, so both are off in these comparisons."""
import copy, json, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

torch.set_num_threads(1)
from ultradino_lab.config import apply_overrides, get_preset, resolve_config
from ultradino_lab.augment import MaskingGenerator, MultiCropAugmentation, collate_dino
from ultradino_lab.meta_arch import MetaArch, build_optimizer_for, split_batch, train_step
from ultradino_lab.schedules import build_schedules
from ultradino_lab.pretrain import pretrain

EQUAL = ['model.drop_path_rate=0', 'dino.koleo_loss_weight=0', 'optim.freeze_last_layer_epochs=0']


def batch(cfg, B, seed):
    g = torch.Generator().manual_seed(seed)
    c = cfg.crops
    aug = MultiCropAugmentation(c.global_crops_size, c.local_crops_size, c.global_crops_scale, c.local_crops_scale,
                                c.local_crops_number, mean=0.2, std=0.2, generator=seed)
    images = [torch.randint(0, 256, (1, 80, 96), dtype=torch.uint8, generator=g) for _ in range(B)]
    grid = c.global_crops_size // cfg.model.patch_size
    return collate_dino(aug.augment_batch(images), MaskingGenerator(grid), 1.0, cfg.ibot.mask_ratio_min_max, rng=seed)


def step_level():
    cfg = resolve_config(apply_overrides(get_preset('smoke'), EQUAL), world_size=1)
    sched = build_schedules(cfg)
    batches = [batch(cfg, 4, s) for s in range(3)]
    ref = MetaArch.from_config(cfg).train(); opt = build_optimizer_for(ref, cfg)
    meta = copy.deepcopy(ref); opt2 = build_optimizer_for(meta, cfg)
    ref_logs = [train_step(ref, opt, [b], sched[i + 2]) for i, b in enumerate(batches)]   # no process group yet
    ref.apply_centre_updates()

    dist.init_process_group('gloo')
    rank = dist.get_rank()
    ddp = DistributedDataParallel(meta.student, broadcast_buffers=False)
    for i, b in enumerate(batches):
        logs = train_step(meta, opt2, [split_batch(b, 2)[rank]], sched[i + 2], student=ddp)
        for k in ('dino_local_crops_loss', 'dino_global_crops_loss', 'ibot_loss', 'total_loss'):
            v = logs[k].clone(); dist.all_reduce(v); v /= 2
            torch.testing.assert_close(v, ref_logs[i][k], atol=1e-5, rtol=1e-4, msg=f'step {i} {k}')
    meta.apply_centre_updates()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(meta.state_dict()[k], v, atol=1e-5, rtol=1e-4, msg=k)
    assert meta.ibot_patch_loss.center.abs().sum() > 0
    return rank


def loop_level(run_dir, manifest):
    return pretrain('smoke', run_dir, manifest=manifest, progress=False,
                    overrides=EQUAL + ['data.splits=null', 'train.precision=fp32', 'train.num_workers=0',
                                       'train.batch_size_per_gpu=2', 'ibot.mask_sample_probability=0', 'ibot.loss_weight=0'],
                    stop_at_iteration=3)


if __name__ == '__main__':
    run_dir, manifest, out = sys.argv[1:4]
    rank = step_level()
    res = loop_level(run_dir, manifest)
    assert dist.is_initialized()          # pretrain used the existing group and left it alone
    with open(f'{out}.rank{rank}', 'w') as f: json.dump(dict(rank=rank, world=dist.get_world_size(), iteration=res.iteration), f)
    dist.destroy_process_group()
