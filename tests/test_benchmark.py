"""The benchmark suite end to end (issue 4, "Done when"), on the real shared data, on CPU: HC18 segmentation of a
smoke-pretrained backbone against random init with the per-image paired comparison in results.csv and the predicted
masks saved next to it (their Dice is the per-image row's); few-shot k-NN
and logistic regression on the 160 FETAL_PLANES_DB images with group-aware draws and mean ± CI; an official-format
DINOv2 checkpoint through the registry in both RGB modes (features once per backbone and task, through the cache);
bad input refused before any long computation."""
import shutil
from dataclasses import replace
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from PIL import Image
import ultradino_lab.benchmark as B
from ultradino_lab.adapters import manifest_from_shared
from ultradino_lab.backbones import load_backbone
from ultradino_lab.core import LabError
from ultradino_lab.imageio import read_mask
from ultradino_lab.manifests import resolve_paths, write_manifest
from ultradino_lab.models import build_backbone
from ultradino_lab.segment import load_seg_predictions
from conftest import to_official
from ultradino_lab.stats import ALL_SHOTS, read_results
from ultradino_lab.benchmark import TASKS, Task, benchmark, is_comparison

CPU = dict(device='cpu', precision='fp32', progress=False, cache_dir=False)
TINY = dict(kind='random-init', arch='vit_tiny_patch16_224', depth=2, num_register_tokens=4, img_size=64)   # the smoke shape


pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory):
    "A run folder pretrained with the `smoke` preset (8 iterations) on 64 HC18 frames, from a manifest file."
    from ultradino_lab.pretrain import pretrain
    d = tmp_path_factory.mktemp('pretrain')
    hc = manifest_from_shared('hc18')
    manifest = write_manifest(hc[hc.split == 'dev_train'].head(64), d/'hc18_manifest.csv')
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        r = pretrain('smoke', run_dir=d/'smoke-run', manifest=manifest, progress=False,
                     overrides=['data.splits=null', 'optim.epochs=1', 'optim.warmup_epochs=0', 'train.official_epoch_length=8',
                                'optim.freeze_last_layer_epochs=0', 'train.precision=fp32'])
    finally: torch.set_num_threads(n)
    assert r.status == 'finished' and r.backbone.is_file()
    return r.run_dir


# ---- HC18: frozen linear head, smoke-pretrained vs random init, paired over the same test images
def test_hc18_segmentation_rows_and_paired_comparison_in_results_csv(smoke_run, tmp_path):
    res = benchmark([smoke_run, dict(TINY, seed=1, name='random-init')], ['hc18'], ['seg_linear'], results=tmp_path/'bench',
                    img_size=64, quick=True, limit={'train': 96, 'test': 40}, **CPU)
    tab = read_results(tmp_path/'bench'/'results.csv')
    n_test = int(res.rows.n_test.iloc[0])
    assert 30 <= n_test <= 50 and set(res.backbones.name) == {'smoke-run', 'random-init'}
    for b in ('smoke-run', 'random-init'):
        r = tab[(tab.backbone == b)]
        assert set(r.dataset) == {'hc18'} and set(r.task) == {'segmentation'} and set(r.protocol) == {'linear'}
        assert set(r.shots) == {ALL_SHOTS} and set(r.n_test) == {n_test} and set(r.img_size) == {'64'}
        v = r.set_index('metric').value
        for m in ('dice_fg_dataset', 'mdice_dataset', 'dice_fg_image', 'hc_abs_err_mm', 'hc_abs_err_mm_median'):
            assert np.isfinite(v[m]), (b, m)
        assert 0 <= v['dice_fg_dataset'] <= 1 and v['hc_abs_err_mm'] >= 0
    c = tab[is_comparison(tab)]
    assert set(c.backbone) == {'smoke-run vs random-init'} and set(c.reference) == {'smoke-run'}
    img = c[c.paired_over == 'images'].set_index('metric')
    assert set(img.index) == {'delta_dice_fg_image', 'delta_mdice_image', 'delta_hc_abs_err_mm'}
    assert set(img.n_pairs.astype(int)) == {n_test} and set(img.test) == {'wilcoxon'}
    assert (img.delta_low.astype(float) <= img.value).all() and (img.value <= img.delta_high.astype(float)).all()
    assert set(c[c.paired_over == 'split'].metric) == {'delta_dice_fg_dataset', 'delta_mdice_dataset'}   # n = 1: not per image
    # the pairs are the same test images, and their mean is the aggregate row
    per = read_results(tmp_path/'bench'/'results.per_image.csv')
    dice = per[per.metric == 'dice_fg_image']
    a, b = (dice[dice.backbone == n].set_index('image').value for n in ('smoke-run', 'random-init'))
    assert len(a) == n_test and set(a.index) == set(b.index)
    agg = tab[tab.metric == 'dice_fg_image'].set_index('backbone').value
    assert float(img.loc['delta_dice_fg_image', 'mean_a']) == pytest.approx(agg['smoke-run'])
    assert img.loc['delta_dice_fg_image', 'value'] == pytest.approx((a - b[a.index]).mean())
    assert img.loc['delta_dice_fg_image', 'value'] == pytest.approx(agg['smoke-run'] - agg['random-init'])
    md = (tmp_path/'bench'/'results.comparison.md').read_text()
    assert 'smoke-run vs random-init' in md and 'hc_abs_err_mm (mm)' in md and 'wilcoxon' in md
    assert len(pd.read_csv(tmp_path/'bench'/'results.comparison.csv')) == len(c)
    # the predicted test masks, one file per backbone: recomputed from a saved mask and its ground truth, the per-image
    # Dice is the one in results.per_image.csv, for every test image
    masks = tmp_path/'bench'/'results.masks'
    assert res.paths['masks'] == masks
    assert sorted(f.relative_to(masks).as_posix() for f in masks.rglob('*')) == [
        'hc18', 'hc18/linear', 'hc18/linear/random-init.npz', 'hc18/linear/smoke-run.npz']
    for name, per_b in (('smoke-run', a), ('random-init', b)):
        sp = load_seg_predictions(masks/'hc18'/'linear'/f'{name}.npz')
        assert (sp.backbone, sp.dataset, sp.protocol, sp.benchmark_id) == (name, 'hc18', 'linear', res.benchmark_id)
        assert sorted(sp.rows.image) == sorted(per_b.index)
        truth = resolve_paths(sp.rows, 'mask_path')
        recomputed = {}
        for img, mp in zip(sp.rows.image, truth):
            gt, pm = read_mask(mp) == 1, sp.mask(img)
            assert pm.shape == gt.shape and pm.dtype == np.uint8 and set(np.unique(pm)) <= {0, 1}
            pm = pm == 1
            recomputed[img] = 2 * (pm & gt).sum() / (pm.sum() + gt.sum())
        assert pd.Series(recomputed)[per_b.index].to_numpy() == pytest.approx(per_b.to_numpy(), abs=1e-9)


# ---- FETAL_PLANES_DB: few-shot k-NN and logistic regression, 5 group-aware draws, mean ± CI
def test_fetal_planes_few_shot_knn_and_logreg_mean_ci(tmp_path, monkeypatch):
    calls, real = [], B.few_shot
    def spy(*a, **kw):
        calls.append(kw); return real(*a, **kw)
    monkeypatch.setattr(B, 'few_shot', spy)
    res = benchmark([dict(TINY, name='tiny-a'), dict(TINY, seed=1, name='tiny-b')], ['fetal_planes'], ['few_shot_knn', 'few_shot_logreg'],
                    shots=(1, 5), tries=5, img_size=64, quick=True, results=tmp_path/'results.csv', **CPU)
    assert len(calls) == 2 and all(kw['group_aware'] and kw['group_col'] == 'group' and kw['tries'] == 5 for kw in calls)
    rows = res.rows
    assert set(rows.protocol) == {'knn', 'logreg'} and set(rows.shots) == {1, 5} and set(rows.draw) == set(range(5))
    knn = rows[rows.protocol == 'knn']
    assert all((g.n_train == 6 * k).all() for k, g in knn.groupby('shots'))                # k images of each of 6 classes
    s = res.summary
    head = s[s.metric.isin(['accuracy', 'macro_f1']) & s.class_name.isna()]
    assert set(head.protocol) == {'knn', 'logreg'} and set(head.n) == {5}
    assert np.isfinite(head.ci).all() and (head.ci_low <= head['mean']).all() and (head['mean'] <= head.ci_high).all()
    # the same draws for both backbones: paired over the 5 draws
    c = res.comparison
    fs = c[c.metric == 'accuracy']
    assert set(fs.paired_over) == {'draws'} and set(fs.n) == {5} and set(fs.test) == {'t'}
    tab = read_results(tmp_path/'results.csv')
    assert len(tab[~is_comparison(tab)]) == len(rows) and set(tab[is_comparison(tab)].backbone) == {'tiny-a vs tiny-b'}


# ---- an official-format DINOv2 checkpoint through the registry, both RGB modes

def test_official_dinov2_in_both_rgb_modes_via_registry(tmp_path, monkeypatch):
    torch.manual_seed(0)
    src = build_backbone('vit_small_patch14_reg4_dinov2', patch_size=14, in_chans=3, num_register_tokens=4, img_size=56, depth=2)
    off = to_official(src)
    assert 'register_tokens' in off and off['pos_embed'].shape == (1, 17, 384) and off['patch_embed.proj.weight'].shape[1] == 3
    torch.save(off, tmp_path/'dinov2_vits14_reg4_pretrain.pth')
    spec = 'dinov2:vit_small_patch14_reg4_dinov2:dinov2_vits14_reg4_pretrain.pth'
    (tmp_path/'registry.yaml').write_text(f"dinov2-sum: {{spec: '{spec}', depth: 2, rgb_mode: sum}}\n"
                                          f"dinov2-repeat: {{spec: '{spec}', depth: 2, rgb_mode: repeat}}\n")
    seen, real = [], B.extract_features
    def spy(*a, **kw):
        f = real(*a, **kw); seen.append((f.meta['backbone_name'], f.from_cache)); return f
    monkeypatch.setattr(B, 'extract_features', spy)
    kw = dict(tasks=['fetal_planes'], protocols=['knn', 'logreg', 'few_shot_knn'], shots=(1,), img_size=56, quick=True,
              results=tmp_path/'results.csv', **(CPU | dict(cache_dir=tmp_path/'cache')))
    res = benchmark(tmp_path/'registry.yaml', **kw)
    info = res.backbones.set_index('name')
    assert info.loc['dinov2-sum', ['kind', 'in_chans', 'rgb_mode', 'patch_size', 'registers']].tolist() == ['dinov2', 1, 'sum', 14, 4]
    assert info.loc['dinov2-repeat', ['in_chans', 'rgb_mode']].tolist() == [3, 'repeat']
    assert seen == [('dinov2-sum', False), ('dinov2-repeat', False)]           # one extraction per (backbone, task)
    rows = res.rows
    for b in ('dinov2-sum', 'dinov2-repeat'):
        r = rows[(rows.backbone == b) & rows.class_name.isna() & (rows.metric == 'accuracy')]
        assert set(r.protocol) == {'knn', 'logreg'} and r.value.between(0, 1).all()
    assert set(res.comparison.backbone_b) == {'dinov2-repeat'} and 'dinov2-sum vs dinov2-repeat' in res.tables
    assert len(list((tmp_path/'cache').glob('features-*.npz'))) == 2               # two fingerprints: two feature sets
    seen.clear()
    again = benchmark(tmp_path/'registry.yaml', **kw)                             # the second time: from the cache
    assert seen == [('dinov2-sum', True), ('dinov2-repeat', True)]
    pd.testing.assert_series_equal(again.rows.value, res.rows.value)


# ---- bad input: a clear LabError before any long computation
@pytest.fixture
def no_work(monkeypatch):
    def boom(*a, **k): pytest.fail('long work started before the input was refused')
    for name in ('extract_features', 'few_shot', 'train_segmentation', 'few_shot_segmentation', 'finetune_classifier', 'few_shot_finetune'):
        monkeypatch.setattr(B, name, boom)

def mini_hc18(folder, n=4):
    "n dev_train + n dev_val HC18 frames and masks copied to `folder` (a dataset root named 'mini')."
    hc = manifest_from_shared('hc18')
    df = hc[hc.split.isin(['dev_train', 'dev_val'])].groupby('split').head(n).copy()
    for col in ('path', 'mask_path'):
        for src, rel in zip(resolve_paths(df, col), df[col]):
            (folder/rel).parent.mkdir(parents=True, exist_ok=True); shutil.copy(src, folder/rel)
    return df.assign(dataset='mini')

def test_bad_input_is_refused_before_any_work(tmp_path, no_work):
    tiny = [dict(TINY, name='a'), dict(TINY, seed=1, name='b')]
    def run(**kw):
        return benchmark(**(dict(backbones=tiny, tasks=['fetal_planes'], protocols=['knn'], results=tmp_path/'r.csv', img_size=64) | CPU | kw))
    fp = manifest_from_shared('fetal_planes')
    # a test label not seen in training
    unseen = fp.assign(label=fp.label.where(~((fp.split == 'test') & (fp.label == 'Fetal femur')), 'Fetal heart'))
    with pytest.raises(LabError, match=r"test split 'test' has label\(s\) not seen in the training split 'train': 'Fetal heart' \(3 images\)"):
        run(tasks=[Task('fp', 'classification', manifest=unseen)])
    # k larger than the smallest class: the message names the class and the way out
    with pytest.raises(LabError, match=r"few_shot_knn: k=50 shots per class, but 'Fetal abdomen' has \d+ groups.*on_short='cap'"):
        run(protocols=['knn', 'few_shot_knn'], shots=(1, 50))
    # masks whose classes differ from the task's
    root = tmp_path/'mini'; df = mini_hc18(root)
    i = df.index[df.split == 'dev_train'][1]
    m = np.array(Image.open(root/df.mask_path[i])); m[:5, :5] = 2; Image.fromarray(m).save(root/df.mask_path[i])
    seg = Task('mini', 'segmentation', manifest=df, roots={'mini': str(root)}, train_split='dev_train', val_split=None,
               test_split='dev_val', num_classes=2)
    with pytest.raises(LabError, match=rf"Task 'mini' has 2 classes .* 1 mask\(s\) hold other values — row {i} .*: \[2\]"):
        run(tasks=[seg], protocols=['seg_linear'])
    with pytest.raises(LabError, match=r"num_classes=5, but class\(es\) \[3, 4\] appear in no mask"):
        run(tasks=[replace(seg, num_classes=5)], protocols=['seg_linear'])
    # a backbone whose patch size does not fit the size, or whose input channels do not fit its prepare
    with pytest.raises(LabError, match="Backbone 'a' cannot run knn on 'fetal_planes' at img_size=56: .*not a multiple of the patch size 16"):
        run(img_size=56)
    lb = load_backbone(dict(TINY, name='c'))
    with pytest.raises(LabError, match="Backbone 'c3' cannot run .*3-channel input but the backbone's patch embedding takes in_chans=1"):
        run(backbones=[lb, replace(lb, name='c3', in_chans=3, norm_mean=(0.5,) * 3, norm_std=(0.2,) * 3)])
    # a corrupt (truncated) checkpoint
    torch.save(build_backbone('vit_tiny_patch16_224', depth=2, img_size=64).vit.state_dict(), tmp_path/'tiny.pth')
    data = (tmp_path/'tiny.pth').read_bytes(); (tmp_path/'trunc.pth').write_bytes(data[:len(data) // 3])
    with pytest.raises(LabError, match=r"Backbone backbone 2: .*trunc\.pth: cannot be read"):
        run(backbones=[tiny[0], f'timm:vit_tiny_patch16_224:{tmp_path}/trunc.pth'])
    # an empty split
    with pytest.raises(LabError, match=r"the test split 'holdout' is empty .*splits present: test, train"):
        run(tasks=[Task('fp', 'classification', manifest=fp, test_split='holdout')])
    # and the other things that would fail late: protocol vs task kind, a misspelt option, no val for a grid, a bad table
    with pytest.raises(LabError, match=r"Protocol 'seg_linear' runs on segmentation tasks; the tasks are fetal_planes \(classification\)"):
        run(protocols=['seg_linear'])
    with pytest.raises(LabError, match='knn: unknown option\\(s\\) kk'): run(knn=dict(kk=3))
    with pytest.raises(LabError, match="has no val split, but logreg select"):
        run(tasks=[replace(TASKS['fetal_planes'], val_split=None)], protocols=['logreg'])
    (tmp_path/'other.csv').write_text('a,b\n1,2\n')
    with pytest.raises(LabError, match='is not a results table'): run(results=tmp_path/'other.csv')
    with pytest.raises(LabError, match=r"save_masks='false': give True or False"): run(save_masks='false')
    (tmp_path/'r.masks').write_text('')
    with pytest.raises(LabError, match=r"r\.masks is a file, but the predicted masks go into a folder"): run()
    assert not (tmp_path/'r.csv').exists()


def test_on_short_cap_takes_all_of_a_short_class(tmp_path):
    res = benchmark([dict(TINY, name='a')], ['fetal_planes'], ['few_shot_knn'], shots=(50,), tries=1, on_short='cap',
                    img_size=32, quick=True, results=False, **CPU)
    n = int(res.rows.n_train.iloc[0])
    train = B.prepare_task('fetal_planes').rows('train')
    assert n == train.groupby('label').group.nunique().sum() < 6 * 50        # one image of every patient of every class
    assert any("on_short='cap'" in s for s in res.notes) and res.comparison.empty and res.paths == {}
