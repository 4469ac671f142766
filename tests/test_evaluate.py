"""End-to-end check of the classification protocols on the real shared FETAL_PLANES_DB images (160 images, 6 classes):
few-shot k-NN and logistic regression on simple pixel features with group-aware draws, mean ± CI rows, a paired
comparison of two feature sets over the same draws, and results.csv round trips."""
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

from ultradino_lab.core import LabError
from ultradino_lab.adapters import manifest_from_shared
from ultradino_lab.imageio import read_grey
from ultradino_lab.manifests import resolve_paths, split_by_group
from ultradino_lab.evaluate import few_shot, knn_eval, logistic_regression, linear_probe, LOGREG_CS
from ultradino_lab.stats import (append_results, read_results, paired_comparison, format_comparison, markdown_table,
                                 summarize)

CLASSES = {'Other', 'Maternal cervix', 'Fetal abdomen', 'Fetal brain', 'Fetal femur', 'Fetal thorax'}


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "Small problems: extra torch/BLAS threads only spin, and on busy shared cores make sklearn ~10x slower."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    with threadpool_limits(1): yield
    torch.set_num_threads(n)

@pytest.fixture(scope='module')
def fetal():
    "The 160 images with a patient-level val split carved out of train, and two pixel feature sets."
    df = manifest_from_shared('fetal_planes')
    df = split_by_group(df, {'train': 0.75, 'val': 0.25}, from_split='train', seed=0)
    grey = [read_grey(p) for p in resolve_paths(df)]
    feats = {s: np.stack([np.asarray(Image.fromarray(g).resize((s, s), Image.BILINEAR), np.float32).ravel() / 255 for g in grey])
             for s in (8, 16)}
    return df, feats

PROTOCOLS = [partial(knn_eval, ks=(10, 20)), partial(logistic_regression, Cs=LOGREG_CS[4:36:8])]


def test_few_shot_fetal_planes_mean_ci(fetal):
    df, feats = fetal
    assert len(df) == 160 and set(df.label) == CLASSES and (df.split == 'test').sum() == 40
    res = few_shot(PROTOCOLS, df, feats[16], k_list=(1, 5, 10), tries=5, seed=0, group_aware=True, val_split='val',
                   backbone='pixels16', dataset='fetal_planes', task='planes')
    rows, summ = res
    # per-draw rows: every (k-shot, draw) evaluated by both protocols on the same 40 test images
    acc = rows[rows.metric == 'accuracy']
    assert set(acc.protocol) == {'knn', 'logreg'} and set(acc.shots) == {1, 5, 10} and set(acc.draw) == set(range(5))
    assert set(rows.n_test) == {40} and rows.value.notna().all()
    knn_n = rows[rows.protocol == 'knn'].groupby('shots').n_train.unique()
    assert [list(v) for v in knn_n] == [[6], [30], [60]]                     # k images × 6 classes
    # summary: mean ± CI over the 5 draws for every setting
    s = summ[summ.metric == 'accuracy']
    assert len(s) == 8          # logreg: 3 shots; knn: k=6 (1-shot: 6 images), k=10 and 20 (5- and 10-shot)
    assert (s.n == 5).all() and s.ci.notna().all() and (s.ci_low < s['mean']).all() and (s['mean'] < s.ci_high).all()
    assert s['mean'].between(0, 1).all()
    # pixels beat chance (1/6) on average at 10 shots with logistic regression
    assert s[(s.protocol == 'logreg') & (s.shots == 10)]['mean'].item() > 1/6
    # per-class F1 carries the class name; the confusion matrix sums to the test size in every draw
    assert set(rows[rows.metric == 'f1'].class_name) <= CLASSES
    conf = rows[rows.metric == 'confusion'].groupby(['protocol', 'shots', 'k', 'draw'], dropna=False).value.sum()
    assert (conf == 40).all()


def test_group_aware_draws_and_short_classes(fetal):
    df, feats = fetal
    seen = []
    def spy(train, val, test):
        seen.append(len(train[1])); return knn_eval(train, val, test, ks=(1,))
    with pytest.raises(LabError, match=r"k=20 shots per class, but .*'Fetal abdomen' has \d+ groups"):
        few_shot(spy, df, feats[8], k_list=(1, 20))
    assert seen == []                                   # nothing evaluated before the error
    res = few_shot(spy, df, feats[8], k_list=(20,), tries=2, on_short='cap')
    assert set(res.rows.shots) == {20} and seen and max(seen) < 120


def test_paired_comparison_and_results_csv(fetal, tmp_path):
    df, feats = fetal
    kw = dict(k_list=(5,), tries=6, seed=1, val_split='val', dataset='fetal_planes', task='planes')
    a = few_shot(PROTOCOLS, df, feats[16], backbone='pixels16', **kw).rows
    b = few_shot(PROTOCOLS, df, feats[8], backbone='pixels8', **kw).rows
    path = tmp_path/'results.csv'
    append_results(a, path); append_results(b, path)
    table = read_results(path)
    pd.testing.assert_frame_equal(table, pd.concat([a, b], ignore_index=True))
    c = paired_comparison(table, 'pixels16', 'pixels8')
    assert set(c.protocol) == {'knn', 'logreg'} and (c.n == 6).all() and set(c.test) == {'wilcoxon'}
    merged = a.merge(b, on=['protocol', 'shots', 'seed', 'draw', 'metric', 'k'], suffixes=('_a', '_b'))
    row = c[(c.protocol == 'logreg') & (c.metric == 'accuracy')].iloc[0]
    m = merged[(merged.protocol == 'logreg') & (merged.metric == 'accuracy')]
    assert row.delta == pytest.approx((m.value_a - m.value_b).mean())
    assert row.delta_low <= row.delta <= row.delta_high and 0 <= row.p <= 1
    text = format_comparison(c)
    assert {'pixels16', 'pixels8', 'p', 'n'} <= set(text.columns)
    md = markdown_table(text)
    assert md.count('\n') == len(text) + 2 and '±' in md
    # the same evaluation appended twice is caught, and can be resolved explicitly
    append_results(a, path)
    with pytest.raises(LabError, match='appended twice'): summarize(read_results(path))
    assert len(summarize(read_results(path), duplicates='last')) == len(summarize(table))


def test_linear_probe_few_shot_and_bad_inputs(fetal):
    df, feats = fetal
    res = few_shot(partial(linear_probe, lrs=(1e-3, 1e-1), epochs=2, epoch_length=50), df, {'p8': feats[8], 'p16': feats[16]},
                   k_list=(5,), tries=2, val_split='val')
    r = res.rows
    assert set(r.protocol) == {'linear'} and set(r.feature) == {'p8,p16'} and r.selected.str.match(r'p(8|16) lr=0\.(001|1)$').all()
    bad = feats[8].copy(); bad[np.flatnonzero(df.split == 'train')[0]] = np.nan
    with pytest.raises(LabError, match='NaN or inf'): few_shot(PROTOCOLS[0], df, bad)
    with pytest.raises(LabError, match=r"test.* labels not seen in training: 'Heart' \(\d+ images?\)"):
        lab = np.where((df.split == 'test') & (df.label == 'Fetal brain'), 'Heart', df.label)
        few_shot(PROTOCOLS[0], lab, feats[8], splits=df.split, groups=df.group)
    with pytest.raises(LabError, match="val split 'tuning' has no rows"):
        few_shot(PROTOCOLS[0], df, feats[8], val_split='tuning')
