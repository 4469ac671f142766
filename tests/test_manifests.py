"""End-to-end checks of manifests on the real shared data: the official-release adapters, the validator on a
deliberately broken manifest, patient-level splits and few-shot draws."""
import shutil
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage as ndi

from ultradino_lab.core import LabError
from ultradino_lab.settings import load_settings
from ultradino_lab.imageio import read_mask
from ultradino_lab.manifests import (read_manifest, write_manifest, validate_manifest, split_by_group, sample_k_shot,
                                     resolve_paths)
from ultradino_lab.adapters import (manifest_from_fetal_planes_db, manifest_from_hc18, manifest_from_folder,
                                    manifest_from_shared, FPDB_CLASSES)


@pytest.fixture(scope='module')
def hc18_root(): return load_settings().dataset_root('hc18')

@pytest.fixture(scope='module')
def fp_root(): return load_settings().dataset_root('fetal_planes')

def dice(a, b): return 2 * (a & b).sum() / (a.sum() + b.sum())


# (i) FETAL_PLANES_DB from the official metadata file
def test_fetal_planes_db_official_counts_and_patient_level_val(fp_root):
    df = manifest_from_fetal_planes_db(fp_root, val_fraction=0.2, seed=0)
    assert len(df) == 12400
    assert df.split.isin(['train', 'val']).sum() == 7129
    assert (df.split == 'test').sum() == 5271
    train, val, test = (set(df.group[df.split == s]) for s in ('train', 'val', 'test'))
    assert val and not (train & val) and not (val & test) and not (train & test)
    assert df.groupby('group').split.nunique().max() == 1
    assert set(df.label) == set(FPDB_CLASSES) and df.dataset.eq('fetal_planes_db').all()
    tr = df[df.official_split == 'train']
    assert 0.17 < (tr.split == 'val').mean() < 0.23
    for c in FPDB_CLASSES:   # stratified: every class ~20 % in val
        n = tr[tr.label == c]
        assert 0.12 < (n.split == 'val').mean() < 0.28, c
    print(f"\nFPDB: {len(df)} rows; train {(df.split == 'train').sum()}, val {(df.split == 'val').sum()} "
          f"({df[df.split == 'val'].group.nunique()} patients), test {(df.split == 'test').sum()}")
    again = manifest_from_fetal_planes_db(fp_root, val_fraction=0.2, seed=0)
    assert again.split.tolist() == df.split.tolist()


def test_fetal_planes_db_layout_errors(tmp_path, fp_root):
    (tmp_path/'FETAL_PLANES_DB_data.csv').write_text('Image_name;Plane\nx;Other\n')
    with pytest.raises(LabError, match='Patient_num'): manifest_from_fetal_planes_db(tmp_path)
    with pytest.raises(LabError, match='12400 of 12400'): manifest_from_fetal_planes_db(fp_root, missing_images='error')


# (ii) HC18 official layout built from the shared images; outlines -> filled masks
def _build_hc18_release(dst, hc18_root, rows, n_test=3):
    (dst/'training_set').mkdir(parents=True); (dst/'test_set').mkdir()
    for k, r in enumerate(rows.itertuples()):
        shutil.copy(hc18_root/r.path, dst/'training_set'/r.source_file)
        m = read_mask(hc18_root/r.mask_path).astype(bool)
        line = m & ~ndi.binary_erosion(m, iterations=1 + k % 2, border_value=1)   # 1-2 px outline, clipped at the border
        if k % 3 == 2:   # a few small gaps in the drawn outline
            ys, xs = np.nonzero(line)
            for q in (0.3, 0.7):
                x0 = int(np.quantile(xs, q)); line[:ys.mean().astype(int), x0:x0 + 2] = False
        Image.fromarray(line.astype(np.uint8) * 255).save(dst/'training_set'/r.source_file.replace('.png', '_Annotation.png'))
    pd.DataFrame({'filename': rows.source_file, 'pixel size(mm)': rows.orig_pixel_size_mm,
                  'head circumference (mm)': rows.head_circumference_mm}).to_csv(dst/'training_set_pixel_size_and_HC.csv', index=False)
    un = pd.read_csv(hc18_root/'manifest.csv').query("split == 'unlabeled'").head(n_test)
    names = un.source_file.str.replace('test_set/', '', regex=False)
    for p, n in zip(un.path, names): shutil.copy(hc18_root/p, dst/'test_set'/n)
    pd.DataFrame({'filename': names, 'pixel size(mm)': 0.1}).to_csv(dst/'test_set_pixel_size.csv', index=False)


def test_hc18_adapter_recovers_filled_masks(tmp_path, hc18_root):
    shared = pd.read_csv(hc18_root/'manifest.csv')
    dev = shared[shared.split == 'dev_train']
    picks = ['000_HC.png', '002_HC.png', '010_HC.png', '010_2HC.png', '014_2HC.png', '014_3HC.png', '186_HC.png',
             '346_HC.png', '352_2HC.png', '628_2HC.png']    # two subjects with several frames; four heads cut by the border
    rows = shared.set_index('source_file').loc[picks].reset_index()
    rel = tmp_path/'HC18'
    _build_hc18_release(rel, hc18_root, rows)
    df = manifest_from_hc18(rel, progress=False)
    assert df.split.value_counts().to_dict() == {'train': 10, 'unlabeled': 3}
    tr = df[df.split == 'train'].reset_index(drop=True)
    assert tr.group.tolist()[:6] == ['000', '002', '010', '010', '014', '014']
    assert tr.frame_idx.tolist()[:6] == [1, 1, 1, 2, 2, 3]
    assert df[df.split == 'unlabeled'].group.str.startswith('test_').all() and df[df.split == 'unlabeled'].mask_path.isna().all()
    np.testing.assert_allclose(tr.head_circumference_mm, rows.head_circumference_mm)
    dices = {}
    for r, s in zip(tr.itertuples(), rows.itertuples()):
        got = read_mask(rel/r.mask_path)
        assert set(np.unique(got)) == {0, 1}
        dices[s.source_file] = float(dice(got.astype(bool), read_mask(hc18_root/s.mask_path).astype(bool)))
    print('\nHC18 Dice:', {k: round(v, 4) for k, v in dices.items()})
    assert min(dices.values()) >= 0.98, dices
    rep = validate_manifest(df, roots={'hc18': rel}, classes=['background', 'head'], progress=False)
    assert rep.ok, rep
    # second run: masks are cached, not rewritten; the manifest round-trips through a file
    stamp = {p: (rel/p).stat().st_mtime_ns for p in tr.mask_path}
    df2 = manifest_from_hc18(rel, progress=False)
    assert {p: (rel/p).stat().st_mtime_ns for p in tr.mask_path} == stamp
    back = read_manifest(write_manifest(df2, tmp_path/'hc18.parquet'))
    assert back.group.tolist() == df.group.tolist() and (resolve_paths(back, 'mask_path', roots={'hc18': rel}).dropna().map(lambda p: p.is_file())).all()


# (iii) one validator run reports every defect of a broken manifest
def test_validator_reports_every_defect_at_once(tmp_path, hc18_root):
    root = tmp_path/'data'; root.mkdir()
    img = (hc18_root/'images/dev/000_HC.png').read_bytes()
    (root/'ok.png').write_bytes(img)
    (root/'trunc.png').write_bytes(img[:len(img) // 3])
    (root/'fake.png').write_text('this is not a PNG')
    (root/'notes.txt').write_text('not an image at all')
    Image.new('L', (1, 1), 7).save(root/'one_pixel.png')
    g = np.asarray(Image.open(root/'ok.png'))
    Image.fromarray(g.astype(np.uint16) * 257).save(root/'deep16.png')
    assert Image.open(root/'deep16.png').mode.startswith('I')
    m = read_mask(hc18_root/'masks/dev/000_HC_mask.png')
    Image.fromarray(m).save(root/'mask_ok.png')
    Image.fromarray(m[:, :200]).save(root/'mask_narrow.png')
    Image.fromarray(m * 255).save(root/'mask_255.png')
    rows = [  # path, split, label, mask_path, group
        ('ok.png', 'train', 'head', 'mask_ok.png', 'p0'),              # 0 fine
        ('missing.png', 'train', 'head', None, 'p1'),                  # 1 missing file
        ('trunc.png', 'train', 'head', None, 'p2'),                    # 2 truncated
        ('fake.png', 'train', 'head', None, 'p3'),                     # 3 not an image
        ('notes.txt', 'train', 'head', None, 'p4'),                    # 4 not an image type
        ('one_pixel.png', 'train', 'head', None, 'p5'),                # 5 1x1
        ('deep16.png', 'train', 'head', 'mask_ok.png', 'p6'),          # 6 16-bit: fine
        ('ok.png', 'train', 'head', 'mask_narrow.png', 'p7'),          # 7 duplicate of row 0 + mask size
        ('deep16.png', 'val', None, 'mask_255.png', 'p8'),             # 8 duplicate of 6, missing label, 0/255 mask
        ('../../etc/passwd', 'train', 'head', None, 'p9'),             # 9 escapes the root
        ('one_pixel.png', 'val', 'head', None, 'p1'),                  # 10 duplicate of 5 + p1 in train and val
    ]
    df = pd.DataFrame(rows, columns=['path', 'split', 'label', 'mask_path', 'group']).assign(dataset='lab')
    rep = validate_manifest(df, roots={'lab': root}, classes={'background': 0, 'head': 1}, progress=False, num_workers=4)
    got = {(p.check, p.row) for p in rep.problems}
    want = {('missing_file', 1), ('unreadable_image', 2), ('unreadable_image', 3), ('unsupported_type', 4),
            ('too_small', 5), ('duplicate_path', 7), ('mask_size', 7), ('duplicate_path', 8), ('missing_label', 8),
            ('mask_values', 8), ('unsafe_path', 9), ('duplicate_path', 10), ('too_small', 10), ('group_leak', 1)}
    assert got == want, rep
    assert not [p for p in rep.problems if p.row in (0, 6)]      # the 16-bit PNG and good rows are accepted
    leak = next(p for p in rep.problems if p.check == 'group_leak')
    assert "group 'p1'" in leak.message and 'train' in leak.message and 'val' in leak.message
    assert next(p for p in rep.problems if p.check == 'unsafe_path').file == '../../etc/passwd'
    with pytest.raises(LabError) as e: rep.raise_if_problems()
    msg = str(e.value)
    assert f'{len(want)} problem(s)' in msg and all(f'row {r}' in msg for _, r in want) and 'trunc.png' in msg
    with pytest.raises(LabError, match=r'\.\.\. and 10 more'): rep.raise_if_problems(max_listed=4)
    # header-only checks are quick and still find missing files, sizes and mask shapes (not truncation)
    quick = {(p.check, p.row) for p in validate_manifest(df, roots={'lab': root}, check_images='header', progress=False).problems}
    assert {('missing_file', 1), ('too_small', 5), ('mask_size', 7)} <= quick and ('unreadable_image', 2) not in quick
    # a sample opens only that many rows, existence is still checked everywhere
    s = validate_manifest(df, roots={'lab': root}, check_images_sample=2, progress=False)
    assert s.n_files_checked == 2 and ('missing_file', 1) in {(p.check, p.row) for p in s.problems}


def test_validator_whole_manifest_problems(tmp_path):
    df = pd.DataFrame(columns=['dataset', 'path', 'split'])
    assert [p.check for p in validate_manifest(df).problems] == ['no_rows']
    df.to_csv(tmp_path/'empty.csv', index=False)
    assert [p.check for p in validate_manifest(tmp_path/'empty.csv').problems] == ['no_rows']
    pd.DataFrame({'dataset': ['x'], 'path': ['a.png']}).to_csv(tmp_path/'nosplit.csv', index=False)
    rep = validate_manifest(tmp_path/'nosplit.csv', roots={'x': tmp_path}, progress=False)
    assert ('missing_column', 'split') in {(p.check, p.column) for p in rep.problems}
    assert 'missing_file' in {p.check for p in rep.problems}     # the rest is still checked
    with pytest.raises(LabError, match='missing required column'): read_manifest(tmp_path/'nosplit.csv')
    (tmp_path/'empty_folder'/'sub').mkdir(parents=True)
    (tmp_path/'empty_folder'/'sub'/'readme.md').write_text('no images here')
    with pytest.raises(LabError, match='holds no image files'): manifest_from_folder(tmp_path/'empty_folder')


# (iv) patient-level splits and few-shot draws on the 160 shared FETAL_PLANES_DB images
def test_split_and_k_shot_on_shared_fetal_planes():
    fp = manifest_from_shared('fetal_planes')
    assert len(fp) == 160 and validate_manifest(fp, classes=FPDB_CLASSES, progress=False).ok
    sp = split_by_group(fp, {'train': 0.75, 'val': 0.25}, seed=7, from_split='train')
    assert sp.groupby('group').split.nunique().max() == 1
    assert (sp.split == 'test').sum() == 40 and sp.split.isin(['train', 'val']).sum() == 120
    assert set(sp[sp.split == 'val'].label) == set(FPDB_CLASSES)
    assert validate_manifest(sp, classes=FPDB_CLASSES, check_images='none', progress=False).ok
    assert split_by_group(fp, {'train': 0.75, 'val': 0.25}, seed=7, from_split='train').split.tolist() == sp.split.tolist()
    unl = split_by_group(fp.drop(columns='label'), {'a': 0.5, 'b': 0.5}, stratify='label', seed=1)   # no labels: unstratified
    assert unl.groupby('group').split.nunique().max() == 1 and 60 <= (unl.split == 'a').sum() <= 100

    train = sp[sp.split == 'train']
    draws = sample_k_shot(train, k=5, tries=4, seed=3)
    for d in draws:
        assert d.label.value_counts().to_dict() == {c: 5 for c in FPDB_CLASSES}
        assert (d.groupby('label').group.nunique() == 5).all()          # five patients per class
        assert d.index.isin(train.index).all()
    assert sample_k_shot(train, k=5, tries=2, seed=3)[1].index.tolist() == draws[1].index.tolist()
    assert len({tuple(sorted(d.index)) for d in draws}) == 4
    smallest = train.groupby('label').group.nunique().sort_values()
    k = int(smallest.iloc[0]) + 1
    with pytest.raises(LabError, match=f"'{smallest.index[0]}' has {smallest.iloc[0]} groups"): sample_k_shot(train, k=k)
    capped = sample_k_shot(train, k=k, on_short='cap')[0]
    assert capped.label.value_counts()[smallest.index[0]] == smallest.iloc[0]
