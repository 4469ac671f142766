"""The benchmarks as a user runs them: the papermill notebook and `python -m ultradino_lab.bench`, in quick mode on
CPU, write a `bench.json` of the documented shape with every measurement present and none failed, a Markdown
table and the plots. Speed itself is never asserted (performance is measured by the benchmarks, not tested); the
shape, the yardsticks next to each number and the bookkeeping are. The module must also import where only the
library's run-time packages are installed (a bare GPU machine: no fastcore, plotly, papermill or nbdev)."""
import json, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ALL = ['matmul', 'step', 'augment', 'loader', 'features', 'knn', 'manifest']
PHASES = {'data', 'to_device', 'teacher', 'forward', 'backward', 'optimizer', 'ema'}


def check_common(res, names):
    "The parts every result has: format, the machine, each requested measurement (no errors), the summary."
    assert res['format'] == 'ultradino_lab.bench/1' and res['quick'] is True
    assert res['measured'] == names and list(res['measurements']) == names
    for name, r in res['measurements'].items():
        assert 'error' not in r, f"{name} failed: {r['error']}"
        assert r['wall_s'] > 0
    m = res['machine']
    assert m['cpu_count'] >= 1 and m['torch'] and m['gpu'] is None and len(m['load_avg_end']) == 3
    assert res['seconds'] > 0 and res['summary']
    for row in res['summary']:
        assert set(row) == {'measurement', 'what', 'result', 'yardstick', 'ratio', 'target', 'met'}
        assert row['measurement'] in names and row['met'] in (True, False, None)


def test_pipeline_notebook_quick(tmp_path):
    "papermill runs the pipeline (text parameters as papermill passes them): every measurement, its yardstick, plots."
    out = tmp_path/'run'
    out.mkdir()
    cmd = [PY, '-m', 'papermill', str(ROOT/'nbs/pipelines/bench.ipynb'), str(out/'bench.ipynb'), '--cwd', str(ROOT),
           '-p', 'out_dir', str(out), '-p', 'preset', 'smoke', '-p', 'device', 'cpu', '-p', 'precision', 'fp32',
           '-p', 'quick', 'true', '-p', 'progress', 'false']
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out/'bench.json').read_text())
    check_common(res, ALL)
    assert (res['preset'], res['device'], res['precision']) == ('smoke', 'cpu', 'fp32')
    m = res['measurements']
    assert set(m['matmul']) >= {'fp32', 'bf16'} and m['matmul']['fp32']['gflops'] > 0
    (run,) = m['step']['runs']                            # quick: the chosen precision only
    assert run['precision'] == 'fp32' and run['batch_size'] == 4 and run['crops'] == '2x64 + 2x32'
    assert run['flops_per_image'] > 0 and run['images_per_s'] > 0 and run['limit_gflops'] > 0
    assert abs(run['mfu'] - run['achieved_gflops'] / run['limit_gflops']) < 1e-9
    assert set(run['phases_s']) == PHASES and run['peak_memory_mb'] > 0
    assert run['host_syncs_per_step'] is None              # counted on CUDA only
    a = m['augment']
    assert a['reference_images_per_s'] > 0 and abs(a['speedup'] - a['batched_images_per_s'] / a['reference_images_per_s']) < 1e-9
    (ld,) = m['loader']['runs']
    assert ld['num_workers'] >= 0 and 0 <= ld['wait_fraction'] < 1 and ld['steps'] == 2
    assert m['features']['model_images_per_s'] > 0 and m['features']['flops_per_image'] > 0
    assert m['knn']['n_train'] == 1000 and m['knn']['ks'] == [10, 20, 100, 200] and m['knn']['sklearn_queries_per_s'] > 0
    assert [s['rows'] for s in m['manifest']['sizes']] == [5_000, 50_000] and m['manifest']['file_check_rows'] > 0
    targets = {r['what'] for r in res['summary'] if r['target'] != '—'}
    assert any('MFU' in t for t in targets) and any('reference' in r['yardstick'] for r in res['summary'])
    md = (out/'bench.md').read_text()
    assert '| step |' in md and 'MFU of the fastest step' in md and 'backward' in md
    html = (out/'bench.html').read_text()
    assert 'plotly' in html.lower() and len(html) > 1_000_000      # plotly.js inlined: works offline
    nb = json.loads((out/'bench.ipynb').read_text())
    assert not any(o.get('output_type') == 'error' for c in nb['cells'] for o in c.get('outputs', []))


def test_module_command_quick(tmp_path):
    "`python -m ultradino_lab.bench` prints the table and writes the JSON."
    out = tmp_path/'cli'
    cmd = [PY, '-m', 'ultradino_lab.bench', '--out', str(out), '--preset', 'smoke', '--device', 'cpu', '--precision', 'bf16',
           '--quick', '--only', 'matmul,knn', '--only', 'manifest', '--no-progress']
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out/'bench.json').read_text())
    check_common(res, ['matmul', 'knn', 'manifest'])
    assert res['precision'] == 'bf16' and '| knn |' in p.stdout and (out/'bench.md').read_text() in p.stdout + '\n'


BLOCKER = """
import importlib.abc, sys
BLOCKED = {'fastcore', 'plotly', 'papermill', 'nbdev', 'execnb', 'IPython', 'ipywidgets', 'anywidget', 'umap', 'pynndescent', 'matplotlib'}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED: raise ImportError(f'{name} is blocked: not a run-time package')
sys.meta_path.insert(0, Block())
import ultradino_lab.bench as b
assert not (set(m.split('.')[0] for m in sys.modules) & BLOCKED)
print(b.MEASUREMENTS)
sys.exit(b.main(['--out', sys.argv[1], '--only', 'speed']))
"""


def test_imports_with_runtime_packages_only(tmp_path):
    "Torch, timm, numpy, pandas, scipy, scikit-learn, Pillow, PyYAML, tqdm, safetensors suffice; bad input exits 2, before any work."
    p = subprocess.run([PY, '-c', BLOCKER, str(tmp_path/'bad')], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 2, p.stderr[-3000:]
    assert 'matmul' in p.stdout and "unknown measurement(s) 'speed'" in p.stderr and not (tmp_path/'bad').exists()
