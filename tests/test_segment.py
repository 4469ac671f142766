"""Segmentation on the real shared HC18 copy: a frozen linear head end to end (Dice and HC-error rows), the HC of the
ground-truth masks against the official HC, metrics by hand, the multi-level decoder, few-shot rows and bad inputs."""
import math
import numpy as np, pandas as pd, pytest, torch
from PIL import Image
from ultradino_lab.adapters import manifest_from_shared
from ultradino_lab.core import LabError
from ultradino_lab.models import build_backbone
from ultradino_lab.schedules import param_multipliers
from ultradino_lab.segment import (NormalizeGrey, ROW_COLUMNS, SegSplit, build_segmentation_model, evaluate_segmentation,
                                   few_shot_segmentation, intersect_and_union, measure_head_circumference,
                                   segmentation_param_groups, segmentation_scores, train_segmentation)

CPU = dict(device='cpu', precision='fp32', progress=False)

pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py

@pytest.fixture(scope='module')
def hc():
    df = manifest_from_shared('hc18')
    return df[df.split == 'dev_train'], df[df.split == 'dev_val']

@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return build_backbone('vit_tiny_patch16_224', depth=2, img_size=112, num_register_tokens=4)

def test_linear_head_hc18_end_to_end(hc, tiny):
    "Frozen tiny ViT + linear head on dev_train, selected on held-out dev_train rows, scored on dev_val."
    train, val = hc
    test_df = val.iloc[:32]
    model = train_segmentation(tiny, None, train.iloc[:64], train.iloc[64:80], head='linear', img_size=112, iters=150,
                               batch_size=8, eval_every=50, seed=0, **CPU)
    assert model.meta['protocol'] == 'linear' and model.meta['n_train'] == 64 and len(model.history) == 3
    rows = evaluate_segmentation(model, test_df, progress=False)
    assert list(rows.columns[:8]) == list(ROW_COLUMNS)
    assert set(rows.task) == {'segmentation'} and set(rows.protocol) == {'linear'} and set(rows.dataset) == {'hc18'}
    assert set(rows.shots) == {-1} and set(rows.draw) == {0} and set(rows.seed) == {0}
    assert set(rows.n_test) == {32} and set(rows.n_train) == {64} and set(rows.img_size) == {112}
    v = rows.set_index('metric')['value']
    print({k: round(v[k], 3) for k in ('dice_fg_dataset', 'dice_fg_image', 'mdice_dataset', 'miou_dataset', 'hc_abs_err_mm', 'hc_abs_err_mm_median', 'hc_n_failed')})
    for k in ('dice_fg_dataset', 'mdice_dataset', 'miou_dataset', 'dice_class_1_dataset', 'dice_fg_image',
              'mdice_image', 'hc_abs_err_mm', 'hc_abs_err_mm_median', 'hc_err_mm', 'hc_n_failed'):
        assert k in v.index and np.isfinite(v[k]), k
    for k in v.index:
        if k.startswith(('dice', 'iou', 'mdice', 'miou', 'pixel')): assert 0 <= v[k] <= 1, (k, v[k])
    assert 0 <= v['hc_abs_err_mm_median'] and 0 <= v['hc_abs_err_mm'] < 350 and 0 <= v['hc_n_failed'] <= 32
    # the trivial baseline: predict background everywhere
    masks = SegSplit(test_df).masks
    zeros = segmentation_scores(np.stack([intersect_and_union(np.zeros_like(m.numpy()), m.numpy(), 2) for m in masks]))
    assert zeros['dice_fg_dataset'] == 0
    assert v['dice_fg_dataset'] > 0.2 and v['mdice_dataset'] > zeros['mdice_dataset'] + 0.05, (dict(v), zeros)

def test_hc_of_ground_truth_masks(hc):
    "The ellipse fitted to the shared masks gives the official HC to about a millimetre (provenance: median 1.08 mm)."
    train, _ = hc
    sample = train.iloc[::12][:50]
    for method in ('moments', 'boundary'):
        r = measure_head_circumference(sample, method=method)
        err = r.hc_err_mm.abs()
        print(f'{method}: n={len(r)} median |diff| {err.median():.2f} mm, mean {err.mean():.2f}, max {err.max():.2f}')
        assert len(r) == 50 and err.median() < 3 and err.max() < 10

def test_metrics_by_hand():
    "Dataset-accumulated and per-image means differ on a constructed example, as computed by hand."
    A = (np.array([[1, 1], [0, 0]]), np.array([[1, 1], [0, 0]]))
    B = (np.array([[0, 1], [0, 0]]), np.array([[1, 0], [0, 0]]))
    C = (np.array([[0, 0], [0, 1]]), np.array([[0, 0], [0, 255]]))
    s = segmentation_scores(np.stack([intersect_and_union(p, t, 2) for p, t in (A, B, C)]))
    assert math.isclose(s['dice_fg_dataset'], 4 / 6) and math.isclose(s['iou_fg_dataset'], 2 / 4)
    assert math.isclose(s['dice_class_0_dataset'], 14 / 16) and math.isclose(s['miou_dataset'], (2 / 4 + 7 / 9) / 2)
    assert math.isclose(s['dice_fg_image'], 1 / 2) and math.isclose(s['mdice_image'], (1 + 1 / 3 + 1) / 3)

def test_multilevel_decoder_and_layer_decay(hc, tiny):
    "The multi-level decoder trains end to end on 2 real images; its layer-decay groups have the expected multipliers."
    train, _ = hc
    sp = SegSplit(train.iloc[:2])
    from ultradino_lab.segment import letterbox
    boxed = [letterbox(x, 112, m) for x, m in zip(sp.images, sp.masks)]
    x, y = torch.stack([b[0] for b in boxed]), torch.stack([b[1] for b in boxed]).long()
    model = build_segmentation_model(tiny, 2, 'multilevel', channels=32)
    assert model.blocks == [0, 0, 0, 1] and not model.freeze_backbone
    from ultradino_lab.segment import SegmentationLoss
    loss = SegmentationLoss()(model(x), y)
    loss.backward()
    assert torch.isfinite(loss) and model.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.head.conv_seg.weight.grad.abs().sum() > 0
    mult = {k: v[0] for k, v in param_multipliers(segmentation_param_groups(model, layer_decay=0.8)).items()}
    assert math.isclose(mult['backbone.blocks.1.attn.proj.weight'], 0.8)
    assert math.isclose(mult['backbone.blocks.0.attn.proj.weight'], 0.8 ** 2)
    assert math.isclose(mult['backbone.patch_embed.proj.weight'], 0.8 ** 3) and math.isclose(mult['backbone.reg_token'], 0.8 ** 3)
    assert mult['backbone.norm.weight'] == 1 and all(v == 1 for k, v in mult.items() if k.startswith('head.'))
    # applied for real: with AdamW every step moves a weight by about its group's lr, so block 0 moves
    # layer_decay times less than block 1 (and about as much without decay)
    def moved(ld):
        ft = train_segmentation(tiny, None, train.iloc[:2], None, head='multilevel', channels=16, img_size=64, iters=2,
                                batch_size=2, lr=1e-3, layer_decay=ld, warmup_iters=0, augment=False, **CPU)
        assert ft.meta['layer_decay'] == ld and ft.meta['protocol'] == 'multilevel_ft'
        d = [(ft.vit.blocks[i].attn.qkv.weight - tiny.vit.blocks[i].attn.qkv.weight).abs().max().item() for i in (0, 1)]
        return d[0] / d[1]
    assert moved(0.1) < 0.2 and moved(1.0) > 0.5

def test_few_shot_rows(hc, tiny):
    train, val = hc
    rows = few_shot_segmentation(tiny, None, train.iloc[:60], None, val.iloc[:4], shots=(1, 2), tries=2, img_size=64,
                                 iters=3, batch_size=2, **CPU)
    assert set(zip(rows.shots, rows.draw)) == {(1, 0), (1, 1), (2, 0), (2, 1)}
    n = rows.groupby(['shots', 'draw']).n_train.first()
    assert n.loc[(1, 0)] == 1 and n.loc[(2, 1)] == 2
    assert {'dice_fg_dataset', 'hc_abs_err_mm'} <= set(rows.metric)

def test_bad_inputs(hc, tiny, tmp_path):
    train, val = hc
    kw = dict(img_size=64, iters=1, **CPU)
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(tmp_path/'a.png')
    m = np.zeros((32, 48), np.uint8); m[4:9, 4:9] = 3
    Image.fromarray(m).save(tmp_path/'a_mask.png')
    bad = pd.DataFrame({'dataset': ['t'], 'path': ['a.png'], 'mask_path': ['a_mask.png']}, index=['r1'])
    roots, good = {'t': tmp_path}, bad.assign(mask_path='a.png')       # the black image as an all-background mask
    with pytest.raises(LabError, match=r"val_df row r1: mask .*a_mask.png has values \[0, 3\].*num_classes=2"):
        train_segmentation(tiny, None, good, bad, roots=roots, **kw)
    with pytest.raises(LabError, match='train_df has no rows'): train_segmentation(tiny, None, train.iloc[:0], None, **kw)
    model = train_segmentation(tiny, None, good, None, roots=roots, **kw)
    with pytest.raises(LabError, match='test_df has no rows'): evaluate_segmentation(model, val.iloc[:0])
    with pytest.raises(LabError, match='test_df row r1: mask'): evaluate_segmentation(model, bad, roots=roots, progress=False)
    with pytest.raises(LabError, match='multiple of the patch size'): train_segmentation(tiny, None, train.iloc[:2], None, **(kw | dict(img_size=120)))
    with pytest.raises(LabError, match='in_chans=1'): train_segmentation(tiny, NormalizeGrey(in_chans=3), train.iloc[:2], None, **kw)
    rgb = build_backbone('vit_tiny_patch16_224', depth=1, in_chans=3, img_size=64)
    with pytest.raises(LabError, match='in_chans=3'): train_segmentation(rgb, NormalizeGrey(), train.iloc[:2], None, **kw)
    with pytest.raises(LabError, match='k=3'):
        few_shot_segmentation(tiny, None, train.iloc[:2], None, val.iloc[:2], shots=3, tries=1, **kw)
