"""Fine-tuning end to end: layer decay really applied, the best epoch by the maximum validation macro-F1, soft
Mixup/CutMix targets, the real FETAL_PLANES_DB images, a separable toy set, few-shot draws and bad input."""
import math
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import ultradino_lab.finetune as ft
from ultradino_lab.core import LabError
from ultradino_lab.adapters import manifest_from_shared
from ultradino_lab.manifests import split_by_group
from ultradino_lab.models import build_backbone
from ultradino_lab.schedules import vit_layer_id, apply_schedules, build_optimizer
from ultradino_lab.stats import ALL_SHOTS
from ultradino_lab.finetune import (ClassifierModel, FinetuneTransform, GreyNormalize, BestWeights, ULTRADINO_AS_RUN,
                                    finetune_param_groups, make_mixup, finetune_classifier,
                                    few_shot_finetune)


pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py


def tiny_vit(depth=2, img=64, **kw): return build_backbone('vit_tiny_patch16_224', depth=depth, img_size=img, **kw)


def toy_manifest(folder, n_per_class=(12, 4, 4), levels=(200, 40), seed=0):
    "Bright/dark PNGs of random sizes and their manifest with train/val/test splits."
    rng, rows = np.random.default_rng(seed), []
    for split, n in zip(('train', 'val', 'test'), n_per_class):
        for label, level in zip(('bright', 'dark'), levels):
            for i in range(n):
                h, w = rng.integers(48, 90, 2)
                img = np.clip(rng.normal(level, 20, (h, w)), 0, 255).astype(np.uint8)
                name = f'{split}_{label}_{i}.png'; Image.fromarray(img).save(Path(folder)/name)
                rows.append(dict(dataset='toy', path=name, label=label, split=split, group=f'{split}{label}{i}'))
    return pd.DataFrame(rows)


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp('toy')
    df = toy_manifest(folder)
    kw = dict(roots={'toy': str(folder)}, epochs=16, batch_size=4, lr=1e-3, warmup_epochs=1, img_size=64,
              precision='fp32', device='cpu', progress=False)
    return tuple(df[df.split == s] for s in ('train', 'val', 'test')) + (kw,)


@pytest.fixture(scope='module')
def fetal():
    fp = manifest_from_shared('fetal_planes')
    d = split_by_group(fp, {'train': 0.8, 'val': 0.2}, from_split='train', seed=0)
    return tuple(d[d.split == s] for s in ('train', 'val', 'test'))


# ---- layer-wise lr decay
def test_layer_decay_groups_follow_the_reference_formula():
    m = ClassifierModel(tiny_vit().vit, 6)
    groups = finetune_param_groups(m, layer_decay=0.65)
    L = 2
    for g in groups:
        for name in g['param_names']:
            want = 0.65 ** (L + 1 - vit_layer_id(name, L)) if g['module'] == 'backbone' else 1.0
            assert math.isclose(g['lr_multiplier'], want), (name, g['lr_multiplier'], want)
    mults = sorted({round(g['lr_multiplier'], 12) for g in groups})
    assert mults == sorted(round(0.65 ** k, 12) for k in (0, 1, 2, 3))
    # the optimiser's lr per group after apply_schedules: base lr x multiplier
    opt = build_optimizer(groups)
    apply_schedules(opt, dict(lr=1e-4, wd=0.05, last_layer_lr=1e-4))
    for g in opt.param_groups:
        assert math.isclose(g['lr'], 1e-4 * g['lr_multiplier'])
        assert math.isclose(g['weight_decay'], 0.05 * g['wd_multiplier'])
    as_run = finetune_param_groups(m, **{k: v for k, v in ULTRADINO_AS_RUN.items() if k != 'weight_decay'})
    assert {g['lr_multiplier'] for g in as_run} == {1.0} and {g['wd_multiplier'] for g in as_run} == {1.0}


def test_layer_decay_is_in_effect_in_the_training_loop(toy):
    tr, va, te, kw = toy
    bb = tiny_vit().vit
    res = finetune_classifier(bb, None, tr, va, None, **(kw | dict(max_steps=1, warmup_epochs=0, mixup=0, cutmix=0)))
    before, after = dict(bb.named_parameters()), dict(res.model.backbone.named_parameters())
    lr = kw['lr']
    # AdamW's first step moves each weight by at most the group's lr, and by exactly that where |grad| >> eps
    for name, k in [('pos_embed', 3), ('patch_embed.proj.weight', 3), ('blocks.0.attn.proj.weight', 2),
                    ('blocks.1.attn.qkv.weight', 1), ('norm.weight', 0)]:
        moved = (after[name] - before[name]).abs().max().item()
        assert moved == pytest.approx(lr * 0.65 ** k, rel=1e-3), name


# ---- best epoch
def test_best_weights_keep_the_maximum_not_the_minimum(tmp_path):
    lin = torch.nn.Linear(3, 2)
    best = BestWeights(path=tmp_path/'best.pt')
    for epoch, score in enumerate([0.3, 0.8, 0.05, 0.6]):
        with torch.no_grad(): lin.weight.fill_(epoch)
        best.update(epoch, score, lin)
    best.restore(lin)
    assert best.best_epoch == 1 and lin.weight.unique().item() == 1.0
    assert torch.load(tmp_path/'best.pt')['epoch'] == 1


def test_training_loop_restores_the_epoch_with_max_val_macro_f1(toy, monkeypatch):
    "Script the validation macro-F1 per epoch (min at epoch 2, max at epoch 1) and check which weights come back."
    tr, va, te, kw = toy
    scripted, snapshots, calls = [0.30, 0.90, 0.05, 0.60], [], []
    real_predict, real_scores = ft._predict, ft._scores

    def predict(model, loader, *a):
        if len(snapshots) < len(scripted): snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_predict(model, loader, *a)

    def scores(y, p, classes):
        rows, out, cm = real_scores(y, p, classes)
        if len(calls) < len(scripted): out = out | dict(macro_f1=scripted[len(calls)])
        calls.append(1)
        return rows, out, cm

    monkeypatch.setattr(ft, '_predict', predict); monkeypatch.setattr(ft, '_scores', scores)
    res = finetune_classifier(tiny_vit().vit, None, tr, va, te, **(kw | dict(epochs=4)))
    assert res.history.val_macro_f1.tolist() == scripted
    assert res.best_epoch == 1 and res.history.is_best.tolist() == [True, True, False, False]
    state = res.model.state_dict()
    assert all(torch.equal(state[k], snapshots[1][k]) for k in state)
    assert not all(torch.equal(state[k], snapshots[2][k]) for k in state)
    assert res.rows.best_epoch.unique().tolist() == [1]


# ---- mixup / cutmix
@pytest.mark.parametrize('mixup,cutmix', [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_cutmix_targets_are_probabilities(mixup, cutmix):
    np.random.seed(0)
    mix = make_mixup(5, mixup=mixup, cutmix=cutmix, label_smoothing=0.1)
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    for _ in range(10):
        xm, t = mix(x.clone(), y)
        assert t.shape == (6, 5) and torch.allclose(t.sum(1), torch.ones(6))
        assert t.min() >= 0.1 / 5 - 1e-7 and xm.shape == x.shape
    assert make_mixup(5, 0, 0) is None


# ---- augmentation
def test_transform_is_reproducible_and_uint8():
    img = torch.randint(0, 256, (1, 70, 90), dtype=torch.uint8)
    tf = FinetuneTransform(32, crop_scale=(0.5, 1.0), vflip=0.5)
    torch.manual_seed(3); a = [tf(img) for _ in range(4)]
    torch.manual_seed(3); b = [tf(img) for _ in range(4)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert all(u.dtype == torch.uint8 and u.shape == (1, 32, 32) for u in a)
    assert not all(torch.equal(a[0], u) for u in a[1:])


# ---- end to end
def test_fetal_planes_end_to_end(fetal, tmp_path):
    tr, va, te = fetal
    assert not set(tr.group) & set(va.group)
    torch.manual_seed(0)
    res = finetune_classifier(tiny_vit().vit, None, tr, va, te, epochs=6, batch_size=32, lr=1e-3, warmup_epochs=1,
                              img_size=64, mixup=0, cutmix=0, precision='fp32', device='cpu', progress=False,
                              run_dir=tmp_path/'run', backbone_name='random-init-tiny')
    rows = res.rows
    assert list(rows.columns[:8]) == ['backbone', 'dataset', 'task', 'protocol', 'shots', 'draw', 'metric', 'value']
    classes = sorted(tr.label.unique())
    # the one metrics function (evaluate.classification_metrics): the same metric names as the frozen-feature protocols
    assert {'accuracy', 'macro_f1', 'balanced_accuracy', 'auroc_macro', 'f1', 'recall', 'confusion'} <= set(rows.metric)
    assert set(rows[rows.metric == 'f1'].class_name) <= set(classes) and set(rows[rows.metric == 'recall'].class_name) <= set(classes)
    assert rows[rows.metric != 'confusion'].value.dropna().between(0, 1).all()
    assert rows[rows.metric == 'confusion'].value.sum() == len(te) and (rows.shots == ALL_SHOTS).all()
    whole = rows[rows.class_name.isna()].set_index('metric').value
    assert whole[['accuracy', 'macro_f1', 'balanced_accuracy', 'auroc_macro']].notna().all()
    assert (rows.protocol == 'finetune').all() and (rows.split == 'test').all() and (rows.dataset == 'fetal_planes').all()
    assert rows.backbone.unique().tolist() == ['random-init-tiny']
    loss = res.history.train_loss.to_numpy()
    assert loss[-1] < loss[0] and loss[-2:].mean() < loss[:2].mean()
    assert res.confusion.to_numpy().sum() == len(te) and list(res.confusion.index) == classes
    assert res.best_epoch == int(res.history.val_macro_f1.idxmax())
    for f in ('best.pt', 'history.csv', 'rows.csv', 'confusion.csv', 'config.json'): assert (tmp_path/'run'/f).is_file()


def test_separable_toy_set_reaches_100_percent(toy):
    tr, va, te, kw = toy
    torch.manual_seed(0)
    res = finetune_classifier(tiny_vit().vit, None, tr, va, te, **kw)   # full recipe: augmentation, mixup/cutmix, 96 steps
    m = res.metrics
    assert m['accuracy'] == 1.0 and m['macro_f1'] == 1.0 and m['auroc_macro'] == 1.0


def test_bf16_dino_backbone_and_avgpool_run(toy):
    tr, va, te, kw = toy
    res = finetune_classifier(tiny_vit(), None, tr, va, te, **(kw | dict(precision='bf16', avgpool=True, max_steps=2)))
    assert res.config['precision'] == 'bf16' and res.model.head[1].in_features == 2 * 192
    assert res.rows[res.rows.metric != 'confusion'].value.dropna().between(0, 1).all()


def test_few_shot_rows_on_real_data(fetal):
    tr, va, te = fetal
    rows = few_shot_finetune(tiny_vit().vit, None, tr, va, te, shots=(1, 2), tries=2, seed=0, progress=False, epochs=1,
                             warmup_epochs=0, img_size=32, batch_size=16, precision='fp32', device='cpu')
    assert rows[rows.metric == 'accuracy'].groupby(['shots', 'draw']).size().to_dict() == {(1, 0): 1, (1, 1): 1, (2, 0): 1, (2, 1): 1}
    assert rows.groupby('shots').n_train.unique().map(list).to_dict() == {1: [6], 2: [12]}
    assert rows[rows.metric != 'confusion'].value.dropna().between(0, 1).all()
    with pytest.raises(LabError, match="k=50"):
        few_shot_finetune(tiny_vit().vit, None, tr, va, te, shots=50, tries=1, progress=False)


# ---- bad input, before training
def test_bad_input_is_refused_before_training(toy, monkeypatch):
    tr, va, te, kw = toy
    monkeypatch.setattr(ft, 'build_optimizer', lambda *a, **k: pytest.fail('training started'))
    tiny = tiny_vit().vit
    run = lambda **over: finetune_classifier(tiny, **(dict(prepare=None, train_df=tr, val_df=va, test_df=te) | kw | over))
    with pytest.raises(LabError, match=r"test_df has label \['grey'\]"):
        run(test_df=te.assign(label=['grey'] + te.label.tolist()[1:]))
    with pytest.raises(LabError, match=r"val_df has label \['other'\]"): run(val_df=va.assign(label='other'))
    with pytest.raises(LabError, match='train_df is empty'): run(train_df=tr.iloc[:0])
    with pytest.raises(LabError, match='test_df is empty'): run(test_df=te.iloc[:0])
    with pytest.raises(LabError, match='num_classes = 5'): run(num_classes=5)
    with pytest.raises(LabError, match="patch size 16"): run(img_size=50)
    with pytest.raises(LabError, match="no image in train_df"): run(classes=['bright', 'dark', 'grey'])
    with pytest.raises(LabError, match='in_chans=1'): run(prepare=GreyNormalize(channels=3))
    with pytest.raises(LabError, match='warmup_epochs'): run(warmup_epochs=20)
    fixed = build_backbone('vit_tiny_patch16_224', depth=1, img_size=64).vit
    fixed.dynamic_img_size = False; fixed.patch_embed.strict_img_size = True
    with pytest.raises(LabError, match='fixed-size ViT'):
        finetune_classifier(fixed, None, tr, va, te, **(kw | dict(img_size=32)))
    with pytest.raises(LabError, match='VisionTransformer'):
        finetune_classifier(torch.nn.Linear(2, 2), None, tr, va, te, **kw)
