"""The data layer on the real shared datasets: datasets, loaders, normalisation statistics, sector clean-up, the benchmark."""
import json, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from PIL import Image
from torch.utils.data import DataLoader
from ultradino_lab.core import LabError
from ultradino_lab.data import LabelledImages, SegmentationImages, UnlabelledImages, compute_norm_stats
from ultradino_lab.imageio import read_grey
from ultradino_lab.sector import crop_to_sector, mask_text, sector_mask
from ultradino_lab.settings import load_settings
from ultradino_lab.adapters import manifest_from_shared

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope='module')
def hc():
    root = load_settings().dataset_root('hc18')
    return manifest_from_shared('hc18'), root

@pytest.fixture(scope='module')
def fp():
    root = load_settings().dataset_root('fetal_planes')
    return manifest_from_shared('fetal_planes'), root

def resize_pair(x, m, size=(128, 192)):
    "Resize image (bilinear) and mask (nearest) to one size (module level: picklable for loader workers)."
    x = torch.nn.functional.interpolate(x[None].float(), size=size, mode='bilinear', align_corners=False)[0]
    m = torch.nn.functional.interpolate(m[None, None].float(), size=size, mode='nearest')[0, 0]
    return x.round().clamp(0, 255).to(torch.uint8), m.long()

def test_hc18_segmentation_items(hc):
    df, root = hc
    dev = df[df.split != 'unlabeled'].iloc[::150]
    for crop in (False, True):
        ds = SegmentationImages(dev, sector_crop=crop)
        for i in range(len(ds)):
            x, m = ds[i]
            assert x.dtype == torch.uint8 and x.ndim == 3 and x.shape[0] == 1
            assert tuple(x.shape[1:]) == tuple(m.shape) and m.dtype == torch.int64
            assert set(m.unique().tolist()) == {0, 1}
    x, m = SegmentationImages(dev)[0]
    np.testing.assert_array_equal(x[0].numpy(), np.asarray(Image.open(root/dev.path.iloc[0])))

def test_sector_crop_keeps_every_hc18_head(hc):
    "On all 751 labelled HC18 images the sector crop contains every pixel of the head mask."
    df, _ = hc
    dev = df[df.split != 'unlabeled']
    full, crop = SegmentationImages(dev, mask_dtype=torch.uint8), SegmentationImages(dev, sector_crop=True, mask_dtype=torch.uint8)
    cut = []
    for i in range(len(dev)):
        m_full, (x, m) = full[i][1], crop[i]
        if m.numpy().sum(dtype=np.int64) != m_full.numpy().sum(dtype=np.int64): cut.append(dev.path.iloc[i])
    assert not cut, cut
    assert len(dev) == 751

def test_fetal_planes_sector_and_text(fp):
    df, root = fp
    ratios, removed = [], []
    for p in df.path:
        g = read_grey(root/p); s = sector_mask(g)
        c, box = crop_to_sector(g, sector=s)
        ratios.append(c.size / g.size)
        t = mask_text(g, s)
        assert (t[s] == g[s]).all()                  # the sector is never touched
        removed.append(int((t != g).sum()))
    ratios, removed = np.array(ratios), np.array(removed)
    assert (ratios <= 1).all() and (ratios < 0.95).mean() > 0.25   # black borders go on many screenshots
    assert (removed > 0).mean() > 0.8                               # burned-in text on most

def test_fetal_planes_labelled(fp):
    df, _ = fp
    ds = LabelledImages(df)
    assert len(ds.classes) == 6 and len(ds) == 160
    assert sorted(set(ds.targets.tolist())) == list(range(6))
    x, y = ds[5]
    assert x.dtype == torch.uint8 and x.shape[0] == 1 and ds.classes[y] == df.label.iloc[5]
    same = LabelledImages(df.tail(10), classes=ds.classes)     # a validation set keeps the training classes
    assert same.classes == ds.classes

def test_dataloader_with_workers(hc):
    df, _ = hc
    ds = SegmentationImages(df[df.split != 'unlabeled'].head(6), transform=resize_pair, sector_crop=True)
    batches = list(DataLoader(ds, batch_size=3, num_workers=2))
    assert len(batches) == 2
    x, m = batches[1]
    assert x.shape == (3, 1, 128, 192) and m.shape == (3, 128, 192) and x.dtype == torch.uint8
    imgs = list(DataLoader(UnlabelledImages(df.head(4)), batch_size=None, num_workers=2))
    assert [tuple(t.shape) for t in imgs] == [tuple(UnlabelledImages(df.head(4))[i].shape) for i in range(4)]

def test_norm_stats_equal_numpy(hc):
    df, root = hc
    sub = df.iloc[::50].head(20)
    pix = np.concatenate([np.asarray(Image.open(root/p).convert('L')).ravel() for p in sub.path]).astype(np.float64) / 255
    for nw in (0, 2):
        st = compute_norm_stats(sub, num_workers=nw, progress=False, chunk_size=6)
        assert st['n_images'] == 20 and st['n_pixels'] == pix.size
        assert abs(st['mean'] - pix.mean()) < 1e-12 and abs(st['std'] - pix.std()) < 1e-12
    st = compute_norm_stats(sub, roots={'hc18': root}, num_workers=0, progress=False, sector_crop=True)
    crops = np.concatenate([crop_to_sector(read_grey(root/p))[0].ravel() for p in sub.path]) / 255
    assert abs(st['mean'] - crops.mean()) < 1e-12 and abs(st['std'] - crops.std()) < 1e-12

def test_bad_inputs(fp, hc):
    df, _ = fp
    with pytest.raises(LabError, match=r"Row 2: label 'Fetal plane 7' is not one of the classes"):
        LabelledImages(df.head(4).assign(label=['Fetal brain', 'Other', 'Fetal plane 7', 'Other']), classes=sorted(df.label.unique()))
    h, _ = hc
    bad = h.head(3).copy(); bad.loc[1, 'path'] = 'images/dev/does_not_exist.png'
    ds = UnlabelledImages(bad)
    with pytest.raises(LabError, match=r'Row 1: .*does_not_exist\.png: file not found'): ds[1]
    seg = SegmentationImages(h.head(2).assign(mask_path=['masks/dev/000_HC_mask.png', 'masks/dev/missing_mask.png']))
    with pytest.raises(LabError, match=r'Row 1: .*missing_mask\.png: file not found'): seg[1]
    with pytest.raises(LabError, match='missing_mask.png'):
        compute_norm_stats(h.head(2).assign(path=['images/dev/000_HC.png', 'missing_mask.png']), num_workers=0, progress=False)

def test_bench_script_writes_json(tmp_path):
    out = tmp_path/'bench.json'
    r = subprocess.run([sys.executable, 'tools/bench_data.py', '--limit', '20', '--repeats', '1', '--workers', '0',
                        '--out', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res['benchmark'] == 'data_pipeline' and res['data']['n_images'] == 20
    assert {'cpu_count', 'torch', 'numpy', 'PIL'} <= set(res['machine'])
    names = [row['pipeline'] for row in res['results']]
    assert names[0] == res['yardstick'] == 'baseline_pil_numpy' and 'lab_sector_stats' in names
    for row in res['results']:
        assert row['images_per_s'] > 0 and len(row['seconds']) == 1 and row['ratio_to_baseline'] > 0
    assert res['ratio'] > 0 and res['stats']['baseline_matches'] is True
    assert 'images/s' in r.stdout
