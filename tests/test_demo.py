"""The demo (issue 5 item 3, "Done when"): `ultradino-lab demo --quick` as a user runs it — a separate process, one
torch thread — makes the phantom data, pretrains `cpu-small` through the pretrain pipeline, benchmarks the result
against random init (k-NN, linear, few-shot, segmentation) through the benchmark pipeline, writes report.html
through the report pipeline, and prints where everything is: every file it reports exists and holds what it should."""
import json, os, re, subprocess, sys
from pathlib import Path
import nbformat, pytest

ROOT = Path(__file__).resolve().parents[1]


def command() -> list:
    exe = Path(sys.executable).with_name('ultradino-lab')
    return [str(exe)] if exe.exists() else [sys.executable, '-m', 'ultradino_lab.cli']


def test_quick_demo_end_to_end(tmp_path):
    from ultradino_lab.stats import read_results
    out = tmp_path/'demo'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT), ULTRADINO_NUM_WORKERS='1')
    # the phantom set in its own folder: the kernels find it through ULTRADINO_DATASET_PHANTOM, set by the demo
    r = subprocess.run(command() + ['demo', '--quick', '--out', str(out), '--data-dir', str(tmp_path/'phantom')],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1500)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    files = dict(re.findall(r'^  (\w[\w ]*?)\s+: (/\S+)$', r.stdout, flags=re.M))
    assert {'report', 'results', 'comparison', 'backbone', 'config', 'metrics', 'pretrain notebook', 'benchmark notebook',
            'report notebook', 'data', 'demo record'} <= set(files), r.stdout
    for k, p in files.items(): assert Path(p).is_file(), (k, p)
    assert Path(files['report']) == out/'report.html' and Path(files['data']) == (tmp_path/'phantom'/'manifest.csv').resolve()
    assert f'run folder: {out}' in r.stdout and 'Headline results' in r.stdout and 'random-init' in r.stdout

    # pretraining: cpu-small, ten iterations, through the pipeline (its executed notebook holds the parameters)
    m = [json.loads(l) for l in Path(files['metrics']).read_text().splitlines()]
    assert m[0]['event'] == 'start' and m[0]['total_iterations'] == 10 and m[-1]['event'] == 'finished'
    assert any(r['kind'] == 'monitor' for r in m)
    nb = nbformat.read(files['pretrain notebook'], as_version=4)
    assert nb.metadata.papermill.parameters['preset'] == 'cpu-small'
    import yaml
    cfg = yaml.safe_load(Path(files['config']).read_text())
    assert cfg['crops']['global_crops_size'] == 112 and cfg['derived']['total_iterations'] == 10

    # the benchmark: the run against its random-init twin, classification and segmentation, the asked protocols
    tab = read_results(files['results'])
    own = tab[~tab.backbone.str.contains(' vs ')]
    assert set(own.backbone) == {'demo', 'random-init'}
    assert set(zip(own.dataset, own.protocol)) == {('phantom', 'knn'), ('phantom', 'linear'), ('phantom_seg', 'linear')}
    assert set(own[(own.dataset == 'phantom') & (own.protocol == 'knn')].shots) == {-1, 1, 5}        # all, 1-shot, 5-shot
    acc = own[(own.metric == 'accuracy') & own.class_name.isna()]
    assert acc.value.between(0, 1).all() and len(acc) > 0
    assert 'demo vs random-init' in Path(files['comparison']).read_text()

    rec = json.loads(Path(files['demo record']).read_text())
    assert rec['mode'] == 'quick' and set(rec['seconds']) == {'data', 'pretrain', 'benchmark', 'report', 'total'}
    html = Path(files['report']).read_text()
    assert len(html) > 100_000 and 'phantom' in html
