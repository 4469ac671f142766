"""Resume is exact (issue 3, "Done when"): on CPU in fp32, a pretraining run stopped by SIGTERM at iteration k and
resumed ends at iteration n with parameters, optimiser state and losses identical (torch.equal) to an uninterrupted
run to n — with the loader in the main process and with worker processes (also a different number on resume).
Plus the smoke preset end to end: a plain Python call on the shared HC18 images, and the exported backbone loads in timm."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
N_ITERS = 20            # optim.epochs=4 x official_epoch_length=5
STOP_AFTER = 3          # SIGTERM once metrics.jsonl shows this iteration

SCRIPT = r'''
import sys, torch
torch.set_num_threads(1)
from ultradino_lab.pretrain import pretrain
run_dir, manifest, workers = sys.argv[1], sys.argv[2], sys.argv[3]
pretrain('smoke', run_dir, manifest=manifest, progress=False,
         overrides=['data.splits=null', 'train.precision=fp32', f'train.num_workers={workers}', 'optim.epochs=4',
                    'train.official_epoch_length=5', 'train.checkpoint_period=100', 'train.log_every=1'])
print('DONE')
'''


pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')


def _run(run_dir, manifest, workers, timeout=180):
    return subprocess.run([sys.executable, '-c', SCRIPT, str(run_dir), str(manifest), str(workers)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _iterations(run_dir):
    p = Path(run_dir)/'metrics.jsonl'
    if not p.is_file(): return []
    out = []
    for line in p.read_text().splitlines():
        try: row = json.loads(line)
        except json.JSONDecodeError: continue          # a line being written
        if row.get('kind') == 'train': out.append(row['iteration'])
    return out


def _run_and_terminate(run_dir, manifest, workers, timeout=120):
    "Start a run, SIGTERM it once it logged iteration STOP_AFTER; return (returncode, stdout, stderr)."
    p = subprocess.Popen([sys.executable, '-c', SCRIPT, str(run_dir), str(manifest), str(workers)], cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while max(_iterations(run_dir), default=0) < STOP_AFTER:
            if p.poll() is not None: pytest.fail(f'run ended before it was signalled:\n{p.stderr.read()[-3000:]}')
            if time.monotonic() > deadline: pytest.fail('run did not reach the stop iteration in time')
            time.sleep(0.01)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None: p.kill(); p.wait()
    return p.returncode, out, err


def _load(run_dir):
    return torch.load(Path(run_dir)/'checkpoints'/'last.pt', map_location='cpu', weights_only=True)


def _losses(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir)/'metrics.jsonl').read_text().splitlines()]
    return {r['iteration']: r['total_loss'] for r in rows if r['kind'] == 'train'}


def _assert_same_state(a, b):
    assert a['iteration'] == b['iteration'] == N_ITERS
    assert a['model'].keys() == b['model'].keys()
    for k, v in a['model'].items(): assert torch.equal(v, b['model'][k]), k
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys()
    for i in sa:
        for k, v in sa[i].items(): assert torch.equal(v, sb[i][k]), (i, k)
    assert a['sampler'] == b['sampler']


@pytest.fixture(scope='module')
def manifest(tmp_path_factory):
    from ultradino_lab.adapters import manifest_from_shared
    from ultradino_lab.manifests import write_manifest
    return write_manifest(manifest_from_shared('hc18'), tmp_path_factory.mktemp('data')/'hc18.csv')


@pytest.fixture(scope='module')
def uninterrupted(manifest, tmp_path_factory):
    d = tmp_path_factory.mktemp('uninterrupted')/'run'
    r = _run(d, manifest, 0)
    assert r.returncode == 0 and 'DONE' in r.stdout, r.stderr[-3000:]
    return d


@pytest.mark.parametrize('workers,resume_workers', [(0, 0), (2, 1)])
def test_sigterm_then_resume_is_exact(manifest, uninterrupted, tmp_path, workers, resume_workers):
    run = tmp_path/'run'
    code, out, err = _run_and_terminate(run, manifest, workers)
    assert code != 0 and 'DONE' not in out
    assert 'TrainingInterrupted' in err and 'SIGTERM' in err and 'to continue' in err, err[-3000:]
    k = _load(run)['iteration']
    assert STOP_AFTER <= k < N_ITERS                         # stopped mid-run, at the end of a step
    assert max(_iterations(run)) == k
    r = _run(run, manifest, resume_workers)
    assert r.returncode == 0 and 'DONE' in r.stdout, r.stderr[-3000:]
    _assert_same_state(_load(uninterrupted), _load(run))
    assert _losses(run) == _losses(uninterrupted)           # the same loss at every iteration, exactly
    events = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines() if '"event"' in l]
    assert [e['event'] for e in events] == ['start', 'stopped', 'resume', 'finished']


def test_smoke_preset_on_hc18_and_timm_loads_the_backbone(manifest, tmp_path):
    "The smoke preset trains a few iterations through a plain Python call in well under a minute; timm loads the export."
    import timm
    from safetensors.torch import load_file
    from ultradino_lab.pretrain import pretrain
    t0 = time.monotonic()
    res = pretrain('smoke', tmp_path/'smoke', manifest=manifest, overrides=['data.splits=null'], progress=False)
    elapsed = time.monotonic() - t0
    assert res.status == 'finished' and res.iteration == 10
    assert elapsed < 60, f'smoke run took {elapsed:.1f} s'
    spec = json.loads((res.run_dir/'backbone.json').read_text())
    model = timm.create_model(**spec['create_model'])
    model.load_state_dict(load_file(str(res.run_dir/'backbone.safetensors')), strict=True)
    model.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad(): f = model(x)
    assert f.shape == (2, spec['embed_dim']) and torch.isfinite(f).all()
