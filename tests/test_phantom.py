"""The synthetic phantom data set, as the demo uses it: written once, read back as a manifest, the same bytes
whatever the number of scenes or worker processes, never a half-written manifest, and classes a probe can learn."""
import json
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from ultradino_lab.core import LabError
from ultradino_lab.imageio import read_grey, read_mask
from ultradino_lab.manifests import read_manifest, resolve_paths
from ultradino_lab import phantom
from ultradino_lab.phantom import CLASSES, generate_phantom, make_phantom_dataset, phantom_label, sector_mask

KW = dict(progress=False)

@pytest.fixture(scope='module')
def ds(tmp_path_factory):
    "A small labelled + unlabelled set with text marks, shared by the read-only tests."
    root = tmp_path_factory.mktemp('phantom')
    return root, make_phantom_dataset(root, n=90, seed=5, unlabeled=0.2, text_prob=0.3, **KW)

def test_manifest_reads_back_and_every_file_exists(ds):
    root, df = ds
    back = read_manifest(root/'manifest.csv')
    pd.testing.assert_frame_equal(back, df)
    assert list(df.columns[:6]) == ['dataset', 'path', 'split', 'label', 'mask_path', 'group']
    assert (df.dataset == 'phantom').all() and df.scene.tolist() == list(range(90))
    for col in ('path', 'mask_path'):
        paths = resolve_paths(df.dropna(subset=[col]), column=col, roots={'phantom': root})
        assert len(paths) and all(p.is_file() for p in paths)
    assert (df.text_marks > 0).any()
    assert not list(root.rglob('*.tmp'))
    stamp = json.loads((root/'phantom.json').read_text())
    assert stamp['complete'] and stamp['params']['n'] == 90

def test_splits_are_group_disjoint_and_unlabelled_rows_carry_no_labels(ds):
    _, df = ds
    assert (df.groupby('group').split.nunique() == 1).all()
    assert set(df.split) == {'train', 'val', 'test', 'unlabeled'}
    assert df.groupby('group').size().between(1, 5).all()          # 3-5, or fewer for the last patient
    unl, lab = df[df.split == 'unlabeled'], df[df.split != 'unlabeled']
    assert unl.label.isna().all() and unl.mask_path.isna().all() and unl.class_index.isna().all()
    assert lab.label.notna().all() and lab.mask_path.notna().all()
    assert 9 <= len(unl) <= 27                                      # ~20 % of 90, in whole patients

def test_masks_match_labels_and_stay_in_the_sector(ds):
    root, df = ds
    for row in df[df.split != 'unlabeled'].itertuples():
        img, m = read_grey(root/row.path), read_mask(root/row.mask_path)
        _, _, meta = generate_phantom(row.scene, seed=5, text_prob=0.3)
        assert meta['label'] == row.label and row.class_index == CLASSES.index(row.label)
        assert np.array_equal(img, generate_phantom(row.scene, seed=5, text_prob=0.3)[0])
        sec = sector_mask(meta)
        assert not m[~sec].any()
        if row.label == 'background': assert not m.any()
        else: assert set(np.unique(m)) == {0, CLASSES.index(row.label)} and (m > 0).sum() > 30

def test_images_are_not_trivial():
    for i in range(15):
        img, m, meta = generate_phantom(i, seed=2)
        sec = sector_mask(meta)
        assert img[~sec].max() == 0                                 # black outside the fan (no text by default)
        assert img[sec].mean() > 30 and img[sec].std() > 20         # speckled tissue inside it
        assert 0.3 < sec.mean() < 0.9

def test_scene_bytes_do_not_depend_on_n_or_workers(tmp_path):
    a = make_phantom_dataset(tmp_path/'a', n=10, seed=1, **KW)
    b = make_phantom_dataset(tmp_path/'b', n=25, seed=1, num_workers=2, **KW)
    for p in list(a.path) + list(a.mask_path.dropna()):
        assert (tmp_path/'a'/p).read_bytes() == (tmp_path/'b'/p).read_bytes(), p
    assert a.label.tolist() == b.label[:10].tolist() and a.group.tolist() == b.group[:10].tolist()
    c = make_phantom_dataset(tmp_path/'c', n=10, seed=2, **KW)
    assert (tmp_path/'c'/c.path[0]).read_bytes() != (tmp_path/'a'/a.path[0]).read_bytes()

def test_same_arguments_are_a_no_op_and_changed_ones_need_overwrite(tmp_path):
    df = make_phantom_dataset(tmp_path, n=20, seed=0, **KW)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*') if p.is_file()}
    pd.testing.assert_frame_equal(make_phantom_dataset(tmp_path, n=20, seed=0, **KW), df)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*') if p.is_file()} == mtimes
    with pytest.raises(LabError, match='seed: 0 -> 1'): make_phantom_dataset(tmp_path, n=20, seed=1, **KW)
    with pytest.raises(LabError, match='overwrite=True'): make_phantom_dataset(tmp_path, n=20, seed=0, size=64, **KW)
    assert read_manifest(tmp_path/'manifest.csv').equals(df)       # the refused call changed nothing
    small = make_phantom_dataset(tmp_path, n=8, seed=1, size=64, overwrite=True, **KW)
    assert len(small) == 8 and len(list((tmp_path/'images').rglob('*.png'))) == 8   # old scenes removed
    assert Image.open(tmp_path/small.path[0]).size == (64, 64)

def test_a_killed_run_leaves_no_manifest_and_the_next_call_finishes_it(tmp_path, monkeypatch):
    real, calls = phantom.generate_phantom, []
    def dies_after_12(*a, **k):
        calls.append(1)
        if len(calls) > 12: raise KeyboardInterrupt('killed')
        return real(*a, **k)
    monkeypatch.setattr(phantom, 'generate_phantom', dies_after_12)
    with pytest.raises(KeyboardInterrupt): make_phantom_dataset(tmp_path, n=30, seed=4, **KW)
    assert not (tmp_path/'manifest.csv').exists()
    assert json.loads((tmp_path/'phantom.json').read_text())['complete'] is False
    assert len(list((tmp_path/'images').rglob('*.png'))) == 12 and not list(tmp_path.rglob('*.tmp'))
    monkeypatch.setattr(phantom, 'generate_phantom', real)
    df = make_phantom_dataset(tmp_path, n=30, seed=4, **KW)
    ref = make_phantom_dataset(tmp_path/'ref', n=30, seed=4, **KW)
    pd.testing.assert_frame_equal(df, ref)
    for p in list(df.path) + list(df.mask_path.dropna()): assert (tmp_path/p).read_bytes() == (tmp_path/'ref'/p).read_bytes()

def test_foreign_folders_and_bad_arguments_are_refused(tmp_path):
    (tmp_path/'images').mkdir()
    with pytest.raises(LabError, match='not written by make_phantom_dataset'): make_phantom_dataset(tmp_path, n=5, **KW)
    for bad, msg in [(dict(n=0), 'n=0'), (dict(size=16), 'size=16'), (dict(seed=-1), 'seed=-1'),
                     (dict(splits={'train': 1, 'unlabeled': 1}), 'unlabeled=<fraction>'), (dict(unlabeled=1.0), 'unlabeled=1.0'),
                     (dict(class_weights={'kidney': 1}), 'unknown class'), (dict(scenes_per_patient=(0, 2)), 'scenes_per_patient')]:
        with pytest.raises(LabError, match=msg): make_phantom_dataset(tmp_path/'x', n=bad.pop('n', 5), **bad, **KW)

def test_default_folder_is_the_phantom_dataset_root(tmp_path, monkeypatch):
    monkeypatch.setenv('ULTRADINO_DATASET_PHANTOM', str(tmp_path/'ph'))
    df = make_phantom_dataset(n=6, seed=0, **KW)
    assert (tmp_path/'ph'/'manifest.csv').is_file()
    assert all(p.is_file() for p in resolve_paths(df))              # resolves through the lab settings
    monkeypatch.setenv('ULTRADINO_SETTINGS', str(tmp_path/'settings.ini'))
    (tmp_path/'settings.ini').write_text('[datasets]\nhc18 = .\n')
    monkeypatch.delenv('ULTRADINO_DATASET_PHANTOM')
    with pytest.raises(LabError, match="Dataset root 'phantom' is not configured"): make_phantom_dataset(n=6, **KW)

def test_class_balance_follows_the_weights():
    counts = pd.Series([phantom_label(i, 3) for i in range(3000)]).value_counts()
    assert set(counts.index) == set(CLASSES) and counts.between(520, 680).all(), counts
    skew = pd.Series([phantom_label(i, 3, {'background': 1, 'thorax': 4}) for i in range(3000)]).value_counts()
    assert set(skew.index) == {'background', 'thorax'} and 2300 < skew['thorax'] < 2500, skew

def test_a_trivial_feature_tells_the_classes_apart():
    "The demo's k-NN / linear benchmarks need signal: 8x8 thumbnails + logistic regression beat chance (0.2)."
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    X, y = [], []
    for i in range(200):
        img, _, meta = generate_phantom(i, seed=21)
        X.append(np.asarray(Image.fromarray(img).resize((8, 8), Image.BOX), np.float32).ravel() / 255)
        y.append(meta['class_index'])
    acc = cross_val_score(LogisticRegression(max_iter=2000), np.array(X), np.array(y), cv=5).mean()
    assert acc > 0.35, acc
