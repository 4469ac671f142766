"""Headless tests of the explorers (ultradino_lab.widgets) on the real shared FETAL_PLANES_DB images: pytest sets the
controls the way a user would and checks what the widgets display (maps, PNGs, figures, grids, predictions) against
values computed here independently. Also the static embedding page's hover thumbnail in headless Chromium."""
import base64, html, io, re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ultradino_lab.core import LabError
from ultradino_lab.backbones import load_backbone
from ultradino_lab.imageio import read_grey
from ultradino_lab.manifests import resolve_paths
from ultradino_lab.viz import explicit_attention, figure_html, fit_size, prepare_image, thumbnail
from ultradino_lab.widgets import (AttentionExplorer, EmbeddingExplorer, FewShotExplorer, PatchPCAExplorer,
                                   explorer_manifest, features_for)

pytestmark = pytest.mark.usefixtures('one_thread')
REG = 'random-init:vit_small_patch14_reg4_dinov2'   # ViT-S/14 with 4 registers (blocks cut to keep it fast)
TINY = 'random-init:vit_tiny_patch16_224'


@pytest.fixture(scope='module')
def sub():
    "24 FETAL_PLANES_DB images, 4 per class (non-square: 256 wide, 132-193 high)."
    return explorer_manifest('fetal_planes', max_images=24)

@pytest.fixture(scope='module')
def reg(): return load_backbone(REG, depth=2)

@pytest.fixture(scope='module')
def tiny(): return load_backbone(TINY, depth=2)

def grey_of(df, i):
    "The image of row `i`, read straight from disk (not through the widgets' cache)."
    return read_grey(resolve_paths(df.iloc[[i]])[i])

def png_array(b): return np.asarray(Image.open(io.BytesIO(b)))


# ---------------------------------------------------------------- attention

@pytest.mark.parametrize('spec', [REG, TINY])
def test_explicit_attention_reproduces_fused_blocks(sub, spec):
    "Each block's output under the explicit path equals the fused SDPA output; the model is restored afterwards."
    lb = load_backbone(spec, depth=3)
    vit = lb.model
    x, shown = prepare_image(lb, grey_of(sub, 1), long_side=112)
    assert shown.shape[0] != shown.shape[1]
    def block_outputs():
        outs, hooks = [], [b.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone())) for b in vit.blocks]
        with torch.no_grad(): vit.forward_features(x)
        for h in hooks: h.remove()
        return outs
    for b in vit.blocks: b.attn.fused_attn = True
    fused = block_outputs()
    with explicit_attention(lb) as rec: explicit = block_outputs()
    assert len(explicit) == len(fused) == 3
    for f, e in zip(fused, explicit): torch.testing.assert_close(e, f, atol=2e-5, rtol=1e-4)
    assert all('forward' not in b.attn.__dict__ for b in vit.blocks)
    torch.testing.assert_close(torch.stack(block_outputs()), torch.stack(fused), atol=0, rtol=0)
    h, w = lb.feature_grid(shown.shape)
    N = 1 + lb.num_register_tokens + h * w
    assert rec.stack().shape == (3, 1, vit.blocks[0].attn.num_heads, N, N)


def test_attention_explorer_displays_the_controls(sub, reg):
    ae = AttentionExplorer(reg, sub, long_side=112, device='cpu', image_index=2)
    g = reg.feature_grid(fit_size(grey_of(sub, 2).shape, 112, 14))
    assert ae.current_map.shape == g and ae.attention.grid == g
    assert np.isclose(ae.current_map.sum(), 1)                          # registers hidden: renormalised over patches
    img = png_array(ae.view.value)
    assert img.shape[0] == 2 * ae.attention.image.shape[0]               # zoom 2
    # mean of heads == mean of the per-head maps, read back from the widget
    ae.show_registers = True
    mean = ae.current_map.copy()
    per_head = []
    for k in range(6):
        png = ae.view.value
        ae.head = k
        assert ae.view.value != png                                      # each head redraws
        per_head.append(ae.current_map.copy())
    np.testing.assert_allclose(np.mean(per_head, 0), mean, atol=1e-7)
    assert np.abs(per_head[0] - per_head[3]).max() > 1e-4               # heads differ
    # registers shown: raw shares; with the CLS and register shares the CLS row sums to 1
    m = ae.current
    assert m.registers.shape == (4,) and ae.current_map.sum() < 1
    assert np.isclose(ae.current_map.sum() + m.cls + m.registers.sum(), 1, atol=1e-5)
    assert 'CLS→registers' in ae.info.value
    strip_png = png_array(ae.view.value)
    ae.show_registers = False                                           # hidden: the same map renormalised, no strip
    np.testing.assert_allclose(ae.current_map, per_head[-1] / per_head[-1].sum(), atol=1e-9)
    assert png_array(ae.view.value).shape[1] < strip_png.shape[1]
    assert 'renormalised' in ae.info.value
    before = ae.current_map.copy()
    ae.layer = 0
    assert np.abs(ae.current_map - before).max() > 1e-6
    ae.image_index = 5
    assert ae.attention.image.shape == fit_size(grey_of(sub, 5).shape, 112, 14)
    assert html.escape(sub.path[5].split('/')[-1]) in ae.info.value


def test_attention_rollout_of_one_block_is_identity_added_attention(sub):
    "On a 1-block model the rollout map is (A + I) renormalised, with A computed here by hand from the block's qkv."
    lb = load_backbone(REG, depth=1)
    ae = AttentionExplorer(lb, sub.head(3), long_side=112, device='cpu', head=1, rollout=True, show_registers=True)
    assert ae.w_head.disabled and ae.head == 1                           # rollout fuses heads by their mean
    vit, blk = lb.model, lb.model.blocks[0]
    x, _ = prepare_image(lb, grey_of(sub, 0), long_side=112)
    with torch.no_grad():
        t = blk.norm1(vit.norm_pre(vit._pos_embed(vit.patch_embed(x))))
        B, N, D = t.shape
        q, k, _ = blk.attn.qkv(t).reshape(B, N, 3, 6, D // 6).permute(2, 0, 3, 1, 4)
        A = ((q @ k.transpose(-2, -1)) / (D // 6) ** 0.5).softmax(-1)[0].mean(0).double().numpy()
    R = A + np.eye(N)
    R = R / R.sum(1, keepdims=True)
    np.testing.assert_allclose(ae.current_map.ravel(), R[0, 5:], atol=1e-6)
    assert np.isclose(ae.current.cls, R[0, 0], atol=1e-6)
    np.testing.assert_allclose(ae.current.registers, R[0, 1:5], atol=1e-6)
    ae.rollout = False                                                   # the plain attention of head 1 again
    assert not ae.w_head.disabled
    with torch.no_grad():
        A1 = ((q @ k.transpose(-2, -1)) / (D // 6) ** 0.5).softmax(-1)[0, 1].double().numpy()
    np.testing.assert_allclose(ae.current_map.ravel(), A1[0, 5:], atol=1e-6)


# ---------------------------------------------------------------- patch PCA

def test_patch_pca_explorer(sub, tiny):
    pe = PatchPCAExplorer(tiny, sub, long_side=112, device='cpu', zoom=1, threshold=0.5)
    rgb, fg = pe.current_rgb, pe.foreground
    shown = pe._maps(0)[1]
    assert rgb.shape == tiny.feature_grid(shown.shape) + (3,)
    assert rgb.min() >= 0 and rgb.max() <= 1 and 0 < fg.sum() < fg.size
    assert (rgb[~fg] == 0).all() and np.allclose(rgb[fg].max(0), 1) and np.allclose(rgb[fg].min(0), 0)
    np.testing.assert_array_equal(fg, pe.pca.first[0] >= 0.5)
    # the picture: left the image, right the colours; background patches are black there
    img = png_array(pe.view.value)
    H, W = shown.shape
    np.testing.assert_array_equal(img[:H, :W, 0], shown)
    right = img[:H, W + 4:2 * W + 4].astype(int)
    p = tiny.patch_size
    for (i, j) in zip(*np.nonzero(~fg)): assert right[i * p:(i + 1) * p, j * p:(j + 1) * p].max() == 0
    i, j = map(int, np.argwhere(fg)[0])
    np.testing.assert_allclose(right[i * p, j * p] / 255, rgb[i, j], atol=1 / 255 + 1e-6)
    counts = []
    for t in (0, 0.3, 0.6, 0.9):
        pe.threshold = t
        counts.append(int(pe.foreground.sum()))
    assert counts[0] == fg.size and counts == sorted(counts, reverse=True) and counts[-1] < counts[1]
    pe.fit_on = 'label'
    rows = pe.fitted_indices
    assert len(rows) == 4 and rows[0] == 0 and sub.label[rows].nunique() == 1
    assert len(pe.pca.rgb) == 4 and png_array(pe.view.value).shape[0] > 3 * H
    pe.layer = 0
    assert pe.pca.rgb[0].shape == rgb.shape
    with pytest.raises(LabError, match="fit_on='patient'"): pe.fit_on = 'patient'


# ---------------------------------------------------------------- embeddings

@pytest.fixture(scope='module')
def emb_feats(sub, tiny):
    return features_for([tiny, load_backbone(TINY, depth=2, seed=1)], sub, img_size=64, cache_dir=False, device='cpu',
                        progress=False)


def _points(fw, event, pairs):
    "The message the browser sends for points (trace index, point index) of a FigureWidget."
    return dict(new=dict(event_type=event, points=dict(xs=[0] * len(pairs), ys=[0] * len(pairs),
                                                       point_indexes=[p for _, p in pairs], trace_indexes=[t for t, _ in pairs])))

def test_embedding_explorer(sub, emb_feats):
    ee = EmbeddingExplorer(emb_feats, sub, grid_size=5)
    assert len(ee.figures) == 2 and ee.figure is ee.figures[0]
    for fw in ee.figures:                                              # one trace per label, with the label counts
        assert {t.name: len(t.x) for t in fw.data} == sub.label.value_counts().to_dict()
        assert sorted(int(c[0]) for t in fw.data for c in t.customdata) == list(range(len(sub)))
    assert 'PC 1' in ee.figure.layout.xaxis.title.text
    ee.color = 'split'
    assert {t.name: len(t.x) for t in ee.figures[1].data} == sub.split.value_counts().to_dict()
    ee.color = 'label'                                                 # traces updated in place: check every point again
    for name, fw in zip(ee.features, ee.figures):
        assert {t.name: len(t.x) for t in fw.data} == sub.label.value_counts().to_dict()
        for t in fw.data:
            rows = [int(c[0]) for c in t.customdata]
            assert set(sub.label[rows]) == {t.name}
            np.testing.assert_allclose(np.c_[t.x, t.y], ee.coords(name)[rows], rtol=1e-6)
    # a lasso over two traces of the second figure, as the browser reports it
    fw = ee.figures[1]
    ee.figures[1]._handler_js2py_pointsCallback(_points(fw, 'plotly_selected', [(0, 0), (0, 3), (2, 1)]))
    want = sorted([int(fw.data[0].customdata[i][0]) for i in (0, 3)] + [int(fw.data[2].customdata[1][0])])
    assert ee.selected_indices == want and ee.grid_indices == want
    assert sorted(sub.label[r] for r in want) == sorted([fw.data[0].name] * 2 + [fw.data[2].name])
    shown = [png_array(box.children[0].value) for box in ee.grid.children]
    assert len(shown) == 3
    for r, a in zip(want, shown): np.testing.assert_array_equal(a, thumbnail(grey_of(sub, r), 96))
    assert '3 selected' in ee.grid_caption.value
    # hover shows that image beside the figures
    ee.figures[0]._handler_js2py_pointsCallback(_points(ee.figures[0], 'plotly_hover', [(1, 2)]))
    r = int(ee.figures[0].data[1].customdata[2][0])
    assert ee.hovered_index == r
    np.testing.assert_array_equal(png_array(ee.hover_image.value), thumbnail(grey_of(sub, r), 192))
    # more than grid_size selected: the first grid_size shown, all kept
    ee.select(range(9))
    assert ee.selected_indices == list(range(9)) and ee.grid_indices == list(range(5)) and len(ee.grid.children) == 5
    assert 'showing the first 5' in ee.grid_caption.value
    fw._handler_js2py_pointsCallback(_points(fw, 'plotly_deselect', []))
    assert ee.grid_indices == [] and ee.grid.children == ()
    # the static copy carries every thumbnail; its page embeds plotly.js and the hover script
    st = ee.static_figure()
    uris = {int(c[0]): c[1] for t in st.data for c in t.customdata}
    assert sorted(uris) == list(range(len(sub)))
    np.testing.assert_array_equal(png_array(base64.b64decode(uris[7].split(',')[1])), thumbnail(grey_of(sub, 7), 96))


def test_embedding_explorer_bad_inputs(sub, emb_feats):
    one = next(iter(emb_feats.values()))
    with pytest.raises(LabError, match='do not match the 24 manifest rows'): EmbeddingExplorer(one[:10], sub)
    with pytest.raises(LabError, match='one or two backbones'): EmbeddingExplorer({'a': one, 'b': one, 'c': one}, sub)
    with pytest.raises(LabError, match="method='tsne'"): EmbeddingExplorer(one, sub, method='tsne')
    with pytest.raises(LabError, match='no such manifest file'): explorer_manifest('/no/such/manifest.csv')


@pytest.mark.slow
def test_embedding_explorer_umap(sub, emb_feats):
    "UMAP through the widget (the first UMAP in a process compiles numba code: ~30 s)."
    ee = EmbeddingExplorer(emb_feats, sub)
    pca = np.array([ee.figure.data[0].x, ee.figure.data[0].y])
    ee.method = 'umap'
    assert 'UMAP 1' in ee.figure.layout.xaxis.title.text
    assert {t.name: len(t.x) for t in ee.figure.data} == sub.label.value_counts().to_dict()
    assert not np.allclose(np.array([ee.figure.data[0].x, ee.figure.data[0].y]), pca)


def test_static_embedding_page_shows_the_hovered_thumbnail(sub, emb_feats, tmp_path):
    "figure_html in headless Chromium: hovering a point shows that point's thumbnail next to it."
    from browser import chromium, serve
    ee = EmbeddingExplorer(emb_feats, sub)
    fig = ee.static_figure()
    figure_html(fig, tmp_path/'emb.html')
    uri = fig.data[2].customdata[3][1]
    with chromium() as b, serve(tmp_path) as url:
        page = b.new_page()
        errors = []; page.on('pageerror', lambda e: errors.append(str(e)))
        page.goto(url + 'emb.html')
        page.wait_for_function("document.querySelector('.plotly-graph-div') && document.querySelector('.plotly-graph-div')._fullLayout")
        assert page.locator('.ul-hover-thumb').evaluate('e => getComputedStyle(e).display') == 'none'
        x, y = page.evaluate('''() => { const gd = document.querySelector('.plotly-graph-div'), fl = gd._fullLayout;
            const p = gd.calcdata[2][3], r = gd.getBoundingClientRect();
            return [r.left + fl.xaxis._offset + fl.xaxis.c2p(p.x), r.top + fl.yaxis._offset + fl.yaxis.c2p(p.y)]; }''')
        page.mouse.move(x - 40, y - 40); page.mouse.move(x, y, steps=5)       # a real mouse over point 3 of trace 2
        page.wait_for_function("getComputedStyle(document.querySelector('.ul-hover-thumb')).display == 'block'", timeout=10000)
        assert page.locator('.ul-hover-thumb img').get_attribute('src') == uri
        assert page.locator('.ul-hover-thumb img').evaluate('e => e.naturalWidth') == 96
        page.mouse.move(2, 2)
        page.wait_for_function("getComputedStyle(document.querySelector('.ul-hover-thumb')).display == 'none'", timeout=10000)
        assert not errors


# ---------------------------------------------------------------- few-shot neighbours

@pytest.fixture(scope='module')
def fp_feats(tiny):
    df = explorer_manifest('fetal_planes')
    return df, features_for(tiny, df, img_size=64, cache_dir=False, device='cpu', progress=False)[tiny.name]

def test_few_shot_explorer(fp_feats):
    df, X = fp_feats
    fs = FewShotExplorer(X, df, shots=3, n_neighbours=5)
    sup = fs.support_indices
    assert df.label[sup].value_counts().to_dict() == {c: 3 for c in df.label.unique()}    # k per class
    assert set(df.split[sup]) == {'train'} and df.group[sup].nunique() == len(sup)        # one per patient
    assert df.split[fs.query_index] == 'test'
    # what is displayed: neighbours nearest first, their labels and similarities
    caps = [html.unescape(box.children[1].value) for box in fs.grid.children]
    assert len(caps) == 5
    labels = [re.search(r"<b style='color:\w+'>(.*?)</b>", c).group(1) for c in caps]
    rows = [int(re.search(r'row (\d+)', c).group(1)) for c in caps]
    sims = [float(re.search(r'sim (-?[\d.]+)', c).group(1)) for c in caps]
    assert labels == list(df.label[rows]) and rows == fs.neighbour_indices
    for box, r in zip(fs.grid.children, rows): np.testing.assert_array_equal(png_array(box.children[0].value), thumbnail(grey_of(df, r), 112))
    # recomputed here: cosine similarities to the support set, top 5, DINOv2's weighted vote
    S = F.normalize(torch.as_tensor(X[sup], dtype=torch.float32), dim=1)
    q = F.normalize(torch.as_tensor(X[fs.query_index], dtype=torch.float32), dim=0)
    cos = (S @ q).numpy()
    top = np.argsort(-cos, kind='stable')[:5]
    assert [sup[i] for i in top] == rows
    np.testing.assert_allclose(sims, cos[top], atol=5e-4)
    w = torch.softmax(torch.as_tensor(cos[top]) / 0.07, 0).numpy()
    votes = {c: w[[l == c for l in labels]].sum() for c in sorted(set(labels))}
    assert fs.prediction == max(votes, key=votes.get)
    assert fs.is_correct == (fs.prediction == df.label[fs.query_index])
    assert ('✓ right' if fs.is_correct else '✗ wrong') in fs.result.value
    assert f'predicted <b>{html.escape(fs.prediction)}</b>' in fs.result.value
    # majority vote over the displayed labels (ties: the class of the nearer neighbour)
    fs.vote = 'majority'
    n = {c: labels.count(c) for c in labels}
    best = [c for c in n if n[c] == max(n.values())]
    assert fs.prediction == min(best, key=labels.index)
    # other queries, k, draws
    fs.shots = 1
    assert len(fs.support_indices) == 6 and len(fs.grid.children) == 5
    before = fs.support_indices
    fs.draw = 2
    assert fs.support_indices != before and df.label[fs.support_indices].nunique() == 6
    fs.query_index = fs.query_rows[7]
    assert 'query</b> ' + html.escape(f"{fs.query_rows[7]}: {df.label[fs.query_rows[7]]}") in fs.query_caption.value
    with pytest.raises(LabError, match='not a labelled row of the query split'): fs.query_index = sup[0]
    with pytest.raises(LabError, match='shots=99'): fs.shots = 99


def test_few_shot_explorer_bad_inputs(fp_feats):
    df, X = fp_feats
    with pytest.raises(LabError, match="query_split='val' has no labelled rows"): FewShotExplorer(X, df, query_split='val')
    with pytest.raises(LabError, match="needs a 'label' column"): FewShotExplorer(X, df.drop(columns='label'))
    with pytest.raises(LabError, match='do not match the 160 manifest rows'): FewShotExplorer(X[:50], df)
    with pytest.raises(LabError, match="vote='soft'"): FewShotExplorer(X, df, vote='soft')
