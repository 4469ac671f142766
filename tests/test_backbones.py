"""The backbone registry and feature extraction on the real shared datasets: our runs, random init, an official-format
DINOv2 checkpoint (written here) in both RGB modes, bad checkpoints, the feature cache, loader workers, the benchmark."""
import json, re, subprocess, sys, time
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from ultradino_lab.adapters import manifest_from_shared
from ultradino_lab.backbones import IMAGENET_MEAN, load_backbone, read_backbone_registry
from ultradino_lab.config import FUS_MEAN, FUS_STD
from ultradino_lab.core import LabError
from ultradino_lab.data import UnlabelledImages
from ultradino_lab.features import FEATURE_KINDS, RESIZE_POLICIES, EvalTransform, extract_features, feature_cache_key, linear_input
from ultradino_lab.models import build_backbone, export_backbone
from conftest import to_official

ROOT = Path(__file__).resolve().parents[1]

def perturb(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bb.parameters(): p.add_(0.1 * torch.randn(p.shape, generator=g))
    return bb.eval()


@pytest.fixture(scope='module')
def rows():
    "8 real images: 4 HC18 frames and 4 FETAL_PLANES_DB screenshots."
    hc, fp = manifest_from_shared('hc18'), manifest_from_shared('fetal_planes')
    return pd.concat([hc[hc.split == 'dev_train'].head(4), fp.iloc[::40]], ignore_index=True)[['dataset', 'path']]

@pytest.fixture(scope='module')
def official(tmp_path_factory):
    "Official-format ViT-S/14 checkpoints (2 blocks, 56 px native, RGB), with 4 registers and without."
    d = tmp_path_factory.mktemp('dinov2')
    out = {}
    for R in (4, 0):
        arch = 'vit_small_patch14_reg4_dinov2' if R else 'vit_small_patch14_dinov2'
        src = perturb(build_backbone(arch, patch_size=14, in_chans=3, num_register_tokens=R, img_size=56, depth=2), seed=R)
        off = to_official(src)
        assert off['pos_embed'].shape == (1, 17, 384) and off['patch_embed.proj.weight'].shape == (384, 3, 14, 14)
        assert ('register_tokens' in off) == (R > 0) and 'blocks.1.ls1.gamma' in off and 'norm.weight' in off
        path = d/f'dinov2_vits14{"_reg4" if R else ""}_pretrain.pth'
        torch.save(off, path)
        out[R] = (arch, src, path)
    return out

def test_our_run_round_trips(tmp_path, rows):
    src = perturb(build_backbone('vit_tiny_patch16_224', img_size=64, depth=2, num_register_tokens=4), seed=3)
    export_backbone(src, tmp_path/'run', norm_mean=FUS_MEAN, norm_std=FUS_STD)
    lb = load_backbone(tmp_path/'run')
    assert (lb.name, lb.in_chans, lb.patch_size, lb.num_register_tokens, lb.embed_dim, lb.depth) == ('run', 1, 16, 4, 192, 2)
    assert lb.norm_mean == pytest.approx((FUS_MEAN,)) and lb.pos_interp == 'dinov2' and not lb.model.training
    f = extract_features(lb, rows, kinds=['cls', 'patch_maps'], img_size=64, num_workers=0, cache_dir=False, precision='fp32', progress=False)
    tf = EvalTransform(64)
    xb = torch.stack([x for x in UnlabelledImages(rows, transform=tf)])
    with torch.no_grad(): ref = src(lb.prepare(xb))
    np.testing.assert_allclose(f['cls'], ref['x_norm_clstoken'].numpy(), atol=1e-4)
    np.testing.assert_allclose(f['patch_maps'][:, 0].astype(np.float32),
                               ref['x_norm_patchtokens'].reshape(8, 4, 4, 192).permute(0, 3, 1, 2).numpy(), atol=2e-2)

def test_random_init_one_and_three_channels(rows):
    for C in (1, 3):
        lb = load_backbone('random-init:vit_tiny_patch16_224', depth=2, img_size=64, in_chans=C)
        assert lb.in_chans == C and lb.rgb_mode == ('repeat' if C == 3 else None)
        f = extract_features(lb, rows, kinds=['cls', 'mean_patch'], img_size=64, num_workers=0, cache_dir=False, progress=False)
        assert f['cls'].shape == (8, 192) and f['mean_patch'].shape == (8, 192) and np.isfinite(f['cls']).all()

@pytest.mark.parametrize('R', [4, 0])
def test_official_dinov2_both_rgb_modes(official, rows, R):
    arch, src, path = official[R]
    spec = f'dinov2:{arch}:{path}'
    for mode, C in (('sum', 1), ('repeat', 3)):
        lb = load_backbone(spec, depth=2, rgb_mode=mode)
        assert (lb.in_chans, lb.rgb_mode, lb.patch_size, lb.num_register_tokens, lb.img_size) == (C, mode, 14, R, (56, 56))
        f = extract_features(lb, rows, kinds=FEATURE_KINDS, n_last_blocks=2, img_size=56, num_workers=0, cache_dir=False, progress=False)
        assert {k: v.shape for k, v in f.items()} == dict(cls=(8, 384), mean_patch=(8, 384), cls_last4=(8, 768),
                                                         cls_last4_avgpool=(8, 1152), patch_maps=(8, 1, 384, 4, 4))
        assert f.meta['num_register_tokens'] == R
    rep = load_backbone(spec, depth=2, rgb_mode='repeat')
    assert rep.norm_mean == IMAGENET_MEAN
    g = torch.randint(0, 256, (2, 1, 56, 56), dtype=torch.uint8)
    with torch.no_grad():      # repeat mode = the source RGB model on the grey image repeated
        np.testing.assert_allclose(rep.model.forward_features(rep.prepare(g))[:, 0], src(rep.prepare(g))['x_norm_clstoken'], atol=1e-5)

def test_sum_equals_repeat_with_one_normalisation(official, rows):
    arch, _, path = official[4]
    a = load_backbone(f'dinov2:{arch}:{path}', depth=2, rgb_mode='sum', norm_mean=0.45, norm_std=0.225)
    b = load_backbone(f'dinov2:{arch}:{path}', depth=2, rgb_mode='repeat', norm_mean=0.45, norm_std=0.225)
    fa, fb = (extract_features(x, rows, kinds=['cls', 'mean_patch'], img_size=56, precision='fp32', num_workers=0, cache_dir=False,
                               progress=False) for x in (a, b))
    for k in ('cls', 'mean_patch'): assert np.abs(fa[k] - fb[k]).max() < 2e-5
    # with ImageNet's per-channel statistics the two modes are different models
    c = load_backbone(f'dinov2:{arch}:{path}', depth=2, rgb_mode='repeat')
    fc = extract_features(c, rows, kinds=['cls'], img_size=56, precision='fp32', num_workers=0, cache_dir=False, progress=False)
    assert np.abs(fc['cls'] - fa['cls']).max() > 1e-3

def test_bad_checkpoints(official, tmp_path):
    arch, _, path = official[4]
    data = path.read_bytes()
    (tmp_path/'trunc.pth').write_bytes(data[:len(data) // 3])
    with pytest.raises(LabError, match='trunc.pth'): load_backbone(f'dinov2:{arch}:{tmp_path}/trunc.pth', depth=2)
    (tmp_path/'junk.pth').write_bytes(b'\x00' * 1000)
    with pytest.raises(LabError, match='junk.pth'): load_backbone(f'dinov2:{arch}:{tmp_path}/junk.pth', depth=2)
    with pytest.raises(LabError, match='patch kernels but arch vit_small_patch16_224 says patch size 16'):
        load_backbone(f'dinov2:vit_small_patch16_224:{path}', depth=2)
    with pytest.raises(LabError, match='the spec says patch size 16'): load_backbone(f'dinov2:{arch}:{path}', depth=2, patch_size=16)
    with pytest.raises(LabError, match="in_chans=3 was asked for: use rgb_mode='repeat'"): load_backbone(f'dinov2:{arch}:{path}', depth=2, in_chans=3)
    with pytest.raises(LabError, match='4 register tokens'): load_backbone(f'dinov2:vit_small_patch14_dinov2:{path}', depth=2)
    with pytest.raises(LabError, match='2 blocks'): load_backbone(f'dinov2:{arch}:{path}')
    lb = load_backbone(f'dinov2:{arch}:{path}', depth=2)
    with pytest.raises(LabError, match='not a multiple of the patch size 14'):
        extract_features(lb, pd.DataFrame(dict(dataset=['hc18'], path=['x.png'])), img_size=64, cache_dir=False)

def test_cache_hit_and_key(tmp_path, rows, official):
    lb = load_backbone('random-init:vit_tiny_patch16_224', depth=4, img_size=64)
    kw = dict(kinds=FEATURE_KINDS, blocks=[1, 3], img_size=64, num_workers=0, cache_dir=tmp_path, progress=False)
    f1 = extract_features(lb, rows, **kw)
    calls = []
    orig = lb.model.forward_intermediates
    lb.model.forward_intermediates = lambda *a, **k: calls.append(1) or orig(*a, **k)
    t0 = time.perf_counter()
    f2 = extract_features(lb, rows, **kw)
    assert f2.from_cache and not calls and time.perf_counter() - t0 < 5
    for k in FEATURE_KINDS: np.testing.assert_array_equal(f1[k], f2[k])
    assert linear_input(f2, 1).shape == (8, 192) and linear_input(f2, 4, avgpool=True).shape == (8, 960)
    f3 = extract_features(lb, rows, **(kw | dict(img_size=96)))
    assert not f3.from_cache and calls and f3.path != f1.path and f3['patch_maps'].shape == (8, 2, 192, 6, 6)
    # the key follows the rgb mode (through the backbone fingerprint) and the size
    arch, _, path = official[0]
    s, r = (load_backbone(f'dinov2:{arch}:{path}', depth=2, rgb_mode=m) for m in ('sum', 'repeat'))
    keys = {feature_cache_key(b, rows, EvalTransform(n), ['cls'])[0] for b in (s, r) for n in (56, 84)}
    assert len(keys) == 4
    # a corrupt cache file is recomputed, with a warning
    f1.path.write_bytes(b'garbage')
    with pytest.warns(UserWarning, match='unreadable feature cache'):
        f4 = extract_features(lb, rows, **kw)
    assert not f4.from_cache and np.load(f4.path)['cls'].shape == (8, 192)

def test_resize_policies_and_workers(rows):
    lb = load_backbone('random-init:vit_small_patch16_224', depth=1, img_size=224)
    for policy in RESIZE_POLICIES:
        for size in ((32, 48), 64):
            x = EvalTransform(size, policy, patch_size=16)(torch.zeros(1, 216, 320, dtype=torch.uint8))
            assert all(s % 16 == 0 for s in x.shape[-2:])
        f = extract_features(lb, rows, kinds=['patch_maps'], img_size=(48, 64), resize=policy, num_workers=2, batch_size=3,
                             cache_dir=False, progress=False)
        assert f['patch_maps'].shape == (8, 1, 384, 3, 4)
    with pytest.raises(LabError, match='not a multiple of the patch size 16'): EvalTransform(100, patch_size=16)
    with pytest.raises(LabError, match='not a multiple'): extract_features(lb, rows, img_size=(48, 50), cache_dir=False)

def test_registry_file(tmp_path, official):
    arch, _, path = official[4]
    (tmp_path/'backbones.yaml').write_text(
        f"random: random-init:vit_tiny_patch16_224\n"
        f"dinov2-sum: {{spec: 'dinov2:{arch}:{path}', depth: 2}}\n"
        f"dinov2-repeat: {{kind: dinov2, arch: {arch}, path: {path}, depth: 2, rgb_mode: repeat}}\n")
    specs = read_backbone_registry(tmp_path/'backbones.yaml')
    lbs = [load_backbone(s) for s in specs[1:]]
    assert [b.name for b in lbs] == ['dinov2-sum', 'dinov2-repeat'] and [b.in_chans for b in lbs] == [1, 3]

def test_bench_script(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT/'tools/bench_features.py'), '--limit', '4', '--batch-size', '4', '--only', 'smoke',
                          '--workers', '0', '--out', str(tmp_path/'b.json')], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert re.search(r'images/s end to end', out.stdout)
    res = json.loads((tmp_path/'b.json').read_text())
    assert [r['img_size'] for r in res['results']] == [[64, 64], [224, 224]] and all(r['images_per_s'] > 0 for r in res['results'])
