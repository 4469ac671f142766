"""The papermill pipelines (issue 5 item 1, "Done when"): `papermill nbs/pipelines/pretrain.ipynb RUN/pretrain.ipynb -p
preset smoke ...`, then the benchmark and report pipelines, on the shared HC18 images, give a run folder with the
config, metrics, backbone, executed notebooks, results and report.html. A failing run exits non-zero and its saved
notebook shows the error. Each pipeline has exactly one `parameters` cell that papermill can read, and is committed
clean. (nbdev-test skips nbs/pipelines/: these tests run them.)"""
import json, os, shutil, subprocess, sys
from pathlib import Path
import nbformat, pandas as pd, pytest
from ultradino_lab.core import LabError
from ultradino_lab.demo import PIPELINES, PipelineError, pipelines_dir, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'/'pipelines'
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
PARAMS = {'pretrain': {'preset', 'config', 'overrides', 'manifest', 'run_dir', 'device', 'precision', 'num_workers', 'stop_at_iteration',
                       'time_limit_s', 'check_images', 'progress'},
          'benchmark': {'run_dir', 'backbones', 'tasks', 'protocols', 'quick', 'img_size', 'shots', 'tries', 'limit', 'options', 'seed',
                        'device', 'precision', 'check_images', 'progress'},
          'report': {'run_dir', 'out', 'title', 'embeddings', 'progress'}}

pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py


def papermill(*args, cwd):
    return subprocess.run([sys.executable, '-m', 'papermill', '--no-progress-bar', *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=600)


def errors(nb_path) -> list:
    "(ename, evalue) of every error output in an executed notebook."
    nb = nbformat.read(nb_path, as_version=4)
    return [(o.ename, o.evalue) for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if o.output_type == 'error']


def test_pipelines_have_one_parameters_cell_and_are_clean():
    import papermill as pm
    assert pipelines_dir() == NBS
    for name in PIPELINES:
        nb = nbformat.read(NBS/f'{name}.ipynb', as_version=4)
        tagged = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
        assert len(tagged) == 1, name                        # nbdev-clean must keep the tag (allowed_cell_metadata_keys)
        after = next(c for c in nb.cells[tagged[0] + 1:] if c.cell_type == 'code')
        assert f'{name}_arguments(' in after.source          # the next code cell checks them
        assert not any(c.get('outputs') or c.get('execution_count') for c in nb.cells if c.cell_type == 'code'), name
        assert set(pm.inspect_notebook(str(NBS/f'{name}.ipynb'))) == PARAMS[name], name   # every line readable by papermill
        assert (NBS/'params').is_dir()
    for f in ('gpu-pretrain.yaml', 'gpu-benchmark.yaml', 'report.yaml'):
        import yaml
        p = yaml.safe_load((NBS/'params'/f).read_text())
        name = 'pretrain' if 'pretrain' in f else 'benchmark' if 'benchmark' in f else 'report'
        assert set(p) <= PARAMS[name], (f, set(p) - PARAMS[name])


def test_papermill_chain_smoke_on_hc18(tmp_path):
    from ultradino_lab.adapters import manifest_from_shared
    from ultradino_lab.manifests import write_manifest
    from ultradino_lab.stats import read_results
    man = write_manifest(manifest_from_shared('hc18'), tmp_path/'hc18.csv')
    run = tmp_path/'RUN'
    run.mkdir()                                              # papermill wants the output folder to exist
    r = papermill(NBS/'pretrain.ipynb', run/'pretrain.ipynb', '-p', 'preset', 'smoke', '-p', 'run_dir', run, '-p', 'manifest', man,
                  '-p', 'overrides', 'data.splits=[dev_train] optim.epochs=1 train.official_epoch_length=4 optim.warmup_epochs=0',
                  '-p', 'precision', 'fp32', '-p', 'progress', 'false', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = papermill(NBS/'benchmark.ipynb', run/'benchmark.ipynb', '-p', 'run_dir', run, '-y', 'tasks: [hc18, fetal_planes]',
                  '-y', 'protocols: [seg_linear, knn, few_shot_knn]', '-p', 'quick', 'True', '-y', 'shots: [1, 2]',
                  '-y', 'limit: {train: 48, val: 16, test: 32}', '-y', 'options: {seg_linear: {iters: 10, eval_every: 10}}',
                  '-p', 'check_images', 'header', '-p', 'progress', 'false', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # the report through `ultradino-lab pipeline`, which finds the notebook and names the output RUN/report.ipynb
    r = subprocess.run([sys.executable, '-m', 'ultradino_lab.cli', 'pipeline', 'report', str(run), '-p', 'progress', 'false',
                        '--no-progress'], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert r.returncode == 0 and f"report pipeline done: {run/'report.ipynb'}" in r.stdout, r.stderr[-3000:]

    have = {p.name for p in run.iterdir()}
    assert {'config.yaml', 'metrics.jsonl', 'norm_stats.json', 'checkpoints', 'backbone.safetensors', 'backbone.json',
            'pretrain.ipynb', 'benchmark.ipynb', 'report.ipynb', 'results.csv', 'results.per_image.csv',
            'results.comparison.csv', 'results.comparison.md', 'report.html'} <= have, have
    for n in PIPELINES:                                      # records of the runs: parameters kept, no error
        nb = nbformat.read(run/f'{n}.ipynb', as_version=4)
        assert nb.metadata.papermill.parameters['run_dir'] == str(run) and not errors(run/f'{n}.ipynb'), n
    assert nbformat.read(run/'pretrain.ipynb', as_version=4).metadata.papermill.parameters['preset'] == 'smoke'
    m = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    assert m[-1]['event'] == 'finished' and m[0]['total_iterations'] == 4 and m[0]['dataset_size'] == 592
    # the run's backbone against its random-init twin, on both tasks
    tab = read_results(run/'results.csv')
    own = tab[~tab.backbone.str.contains(' vs ')]
    assert set(own.backbone) == {'RUN', 'random-init'}
    assert set(zip(own.dataset, own.protocol)) == {('hc18', 'linear'), ('fetal_planes', 'knn')}
    assert set(own[own.dataset == 'fetal_planes'].shots.dropna()) >= {1, 2}
    assert {'RUN vs random-init'} == set(tab[tab.backbone.str.contains(' vs ')].backbone)
    html = (run/'report.html').read_text()
    assert len(html) > 100_000 and 'RUN' in html and 'plotly' in html.lower()


def test_failing_run_exits_nonzero_with_the_error_in_the_saved_notebook(tmp_path):
    run = tmp_path/'RUN'
    run.mkdir()
    r = papermill(NBS/'pretrain.ipynb', run/'pretrain.ipynb', '-p', 'preset', 'smoke', '-p', 'run_dir', run,
                  '-p', 'manifest', tmp_path/'missing.csv', '-p', 'overrides', 'optim.epoch=3', cwd=tmp_path)
    assert r.returncode != 0
    (ename, evalue), = errors(run/'pretrain.ipynb')
    assert ename == 'LabError' and 'missing.csv' in evalue and "optim.epoch" in evalue   # both problems, one error
    assert not (run/'config.yaml').exists()                 # stopped before any work
    nb = nbformat.read(run/'pretrain.ipynb', as_version=4)
    assert 'An Exception was encountered' in nb.cells[0].source   # papermill's banner at the top of the saved notebook
    # the same through the Python API: a PipelineError (a LabError: exit code 1 in the command) naming the notebook
    with pytest.raises(PipelineError) as e:
        run_pipeline('report', run/'report.ipynb', {'run_dir': str(tmp_path/'no_such_run')}, progress=False)
    assert e.value.ename == 'LabError' and isinstance(e.value, LabError) and e.value.notebook == run/'report.ipynb'
    assert 'no_such_run' in str(e.value) and str(run/'report.ipynb') in str(e.value) and '\n' not in str(e.value)
    assert errors(run/'report.ipynb')[0][0] == 'LabError'


def test_pipelines_folder_from_the_environment(tmp_path, monkeypatch):
    copy = shutil.copytree(NBS, tmp_path/'pipes')
    monkeypatch.setenv('ULTRADINO_PIPELINES', str(copy))
    assert pipelines_dir() == copy.resolve()
    (copy/'report.ipynb').unlink()
    with pytest.raises(LabError, match='missing report.ipynb'): pipelines_dir()
    nb = nbformat.read(NBS/'report.ipynb', as_version=4)
    for c in nb.cells: c.metadata.pop('tags', None)         # what nbdev-clean does without allowed_cell_metadata_keys
    nbformat.write(nb, copy/'report.ipynb')
    with pytest.raises(LabError, match="0 cells tagged 'parameters'"): run_pipeline('report', tmp_path/'r.ipynb', {})
