"""The run report (issue 5, item 5) end to end on the real shared data: a smoke-pretrained run benchmarked into its
own folder against random init (k-NN and few-shot k-NN on FETAL_PLANES_DB, the frozen linear head on HC18, whose
predicted masks the benchmark saves), its report.html with every section, the same page in headless Chromium (no
console error, every plotly figure drawn, nothing fetched from outside 127.0.0.1, a non-blank screenshot), missing
parts and left-over masks of an earlier benchmark call shown as notes, bad inputs refused, and a comparison report
of two runs."""
import re, shutil, warnings
import pytest, torch
import ultradino_lab.benchmark as B
from ultradino_lab.adapters import manifest_from_shared
from ultradino_lab.core import LabError
from ultradino_lab.pretrain import pretrain, read_metrics
from ultradino_lab.report import SECTIONS, load_seg_predictions, predictions_path, save_seg_predictions, write_report
from browser import block_external, chromium, nonblank, page_errors, serve

pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py
CPU = dict(device='cpu', precision='fp32', cache_dir=False)
SMOKE = ['data.splits=null', 'optim.epochs=2', 'optim.warmup_epochs=0', 'train.official_epoch_length=4',
         'optim.freeze_last_layer_epochs=0', 'train.precision=fp32', 'train.log_every=1']
BENCH = dict(shots=(1, 5), img_size=64, quick=True, limit={'train': 96, 'val': 32, 'test': 40}, progress=False, **CPU)
TINY = dict(kind='random-init', arch='vit_tiny_patch16_224', depth=2, num_register_tokens=4, img_size=64, seed=1, name='random-init')


def _frames(hc18):
    return hc18[hc18.split == 'dev_train'].head(64)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    "8 smoke iterations (health monitors every 4) on 64 HC18 frames, then the benchmark into the same folder."
    d, hc18 = tmp_path_factory.mktemp('report'), manifest_from_shared('hc18')
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():   # the smoke teacher's CLS stays collapsed: pretrain warns, the report must say so
            warnings.filterwarnings('ignore', message='iteration .* possible collapse')
            run = pretrain('smoke', run_dir=d/'smoke-run', manifest=_frames(hc18), progress=False,
                           overrides=SMOKE + ['train.rankme_every=1', 'train.rankme_num_samples=32'])
        B.benchmark([run.run_dir, TINY], ['fetal_planes', 'hc18'], ['knn', 'few_shot_knn', 'seg_linear'], results=run.run_dir,
                    save_masks=True, **BENCH)
    finally: torch.set_num_threads(n)
    return run.run_dir


def _section(h, sid):
    "The HTML of one section of the report."
    m = re.search(rf'<section id="{sid}">(.*?)</section>', h, re.S)
    assert m, sid
    return m.group(1)


def test_report_holds_every_section(run_dir):
    out = write_report(run_dir, progress=False, **CPU)
    assert out == run_dir/'report.html' and not list(run_dir.glob('.*report*'))   # written atomically, no temp left
    h = out.read_text()
    for sid in SECTIONS: _section(h, sid)
    n = int(re.search(r'data-figures="(\d+)"', h).group(1))
    assert n >= 10 and h.count('class="plotly-graph-div"') == n
    assert h.count('* plotly.js v') == 1 and '<script src=' not in h        # plotly.js inline, once
    # health: the report flags collapse exactly where pretraining did (this smoke run's teacher CLS has collapsed)
    ev = read_metrics(run_dir, kind='event')
    logged = sorted(ev.loc[ev.event == 'collapse_warning', 'iteration'].astype(int))
    health = _section(h, 'health')
    assert ('possible collapse' in health) == bool(logged)
    if logged: assert f"iteration{'s' if len(logged) > 1 else ''} {', '.join(map(str, logged))}" in health
    # results, comparison, per-class scores, confusion matrices
    res = _section(h, 'results')
    assert 'smoke-run' in res and 'random-init' in res and 'knn k=20' in res and 'dice_fg_dataset' in res
    cmp = _section(h, 'comparison')
    assert 'smoke-run vs random-init' in cmp and 'wilcoxon' in cmp and 'dice_fg_image (%)' in cmp and 'hc_abs_err_mm (mm)' in cmp
    assert 'Fetal brain' in _section(h, 'per-class') and _section(h, 'confusion').count('class="plotly-graph-div"') == 1
    # segmentation: best, median, worst image, each with the ground truth and both backbones' predicted masks
    seg = _section(h, 'segmentation')
    assert seg.count('<figure>') == 9 and seg.count('data:image/png;base64,') == 9
    for w in ('best (reference smoke-run: Dice', 'median (reference', 'worst (reference', 'random-init: Dice'): assert w in seg
    emb = _section(h, 'embeddings')
    assert emb.count('CLS token of the last block at 64x64 px') == 1 and emb.count('class="plotly-graph-div"') == 1


def test_report_renders_offline_in_chromium(run_dir):
    out = run_dir/'report.html'
    if not out.is_file(): write_report(run_dir, progress=False, **CPU)
    with chromium() as b, serve(run_dir) as url:
        page = b.new_page(viewport={'width': 1280, 'height': 900})
        errors, outside = page_errors(page), block_external(page)
        page.goto(url + 'report.html', wait_until='load')
        n = int(page.evaluate('document.body.dataset.figures'))
        page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n}", timeout=30_000)
        drawn = page.evaluate("""Array.from(document.querySelectorAll('.js-plotly-plot')).map(
            d => d.querySelectorAll('.main-svg').length > 0 && d.querySelectorAll('.trace, .hm').length > 0)""")
        assert len(drawn) == n and all(drawn), drawn
        imgs = page.evaluate("Array.from(document.querySelectorAll('.panels img')).map(i => i.complete && i.naturalWidth > 0)")
        assert len(imgs) == 9 and all(imgs)
        shot = page.screenshot()
        page.click('a[href="#segmentation"]')
        assert nonblank(shot) and nonblank(page.screenshot())
        assert not errors, errors
        assert not outside, outside


def test_missing_parts_are_notes_and_bad_inputs_errors(run_dir, tmp_path):
    part = tmp_path/'no-results-yet'; part.mkdir()
    for f in ('config.yaml', 'metrics.jsonl'): shutil.copy(run_dir/f, part/f)
    h = write_report(part, embeddings=False, progress=False).read_text()
    assert 'No results.csv' in _section(h, 'results') and 'No per-image segmentation rows' in _section(h, 'segmentation')
    assert 'Skipped (embeddings=False)' in h and _section(h, 'training').count('class="plotly-graph-div"') == 3
    h = write_report(run_dir/'results.csv', out=tmp_path/'results-only.html', embeddings=False, progress=False).read_text()
    assert 'No training rows' in _section(h, 'training') and 'smoke-run vs random-init' in h
    # masks left over from an earlier benchmark call (another benchmark_id than the per-image rows): not shown, a note says why
    stale = tmp_path/'stale'; stale.mkdir()
    for f in ('results.csv', 'results.per_image.csv', 'results.comparison.csv'): shutil.copy(run_dir/f, stale/f)
    shutil.copytree(run_dir/'results.masks', stale/'results.masks')
    old = load_seg_predictions(predictions_path(stale, 'hc18', 'linear', 'smoke-run'))
    save_seg_predictions(old.path, [old.mask(i) for i in old.rows.image], old.rows.rename(columns={'image': 'path'}),
                         'smoke-run', 'hc18', 'linear', benchmark_id='20240101T000000Z-0000')
    seg = _section(write_report(stale, embeddings=False, progress=False).read_text(), 'segmentation')
    assert 'masks of benchmark 20240101T000000Z-0000, but the per-image rows of smoke-run are of benchmark' in seg
    assert seg.count('<figure>') == 6 and '</span> random-init: Dice' in seg and '</span> smoke-run: Dice' not in seg
    (tmp_path/'empty').mkdir()
    with pytest.raises(LabError, match='is not a run folder: it has none of config.yaml, metrics.jsonl, results.csv'):
        write_report(tmp_path/'empty')
    with pytest.raises(LabError, match='no such run folder'): write_report(tmp_path/'nowhere')
    with pytest.raises(LabError, match="embedding_method='tsne'"): write_report(run_dir, embedding_method='tsne')
    (tmp_path/'bad.npz').write_bytes(b'not a zip')
    with pytest.raises(LabError, match='unreadable predictions file'): load_seg_predictions(tmp_path/'bad.npz')


def test_comparison_report_of_two_runs(run_dir, tmp_path):
    hc18 = manifest_from_shared('hc18')
    b = pretrain('smoke', run_dir=tmp_path/'run-b', manifest=_frames(hc18), progress=False, overrides=SMOKE + ['train.seed=1']).run_dir
    B.benchmark([b], ['fetal_planes'], ['knn', 'few_shot_knn'], results=b, **BENCH)
    out = write_report([run_dir, b], out=tmp_path/'comparison.html', progress=False, **CPU)
    h = out.read_text()
    assert '<title>Comparison: smoke-run, run-b</title>' in h
    cmp = _section(h, 'comparison')
    assert 'Recomputed' in cmp and 'smoke-run vs run-b' in cmp and 'smoke-run vs random-init' in cmp
    assert 'No health-monitor rows for run-b' in _section(h, 'health')
    assert _section(h, 'embeddings').count('class="plotly-graph-div"') == 2     # one map per run's backbone
