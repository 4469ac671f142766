"""The `ultradino-lab` command (issue 5 item 2): `--help` with examples on every subcommand; the exit codes scripts
rely on (1: bad input with a one-line message and no traceback, 2: usage) from the real console process; manifests
built from a folder and from the official FETAL_PLANES_DB layout, validated (every defect listed, exit 1) and
summarised on the shared data; pretraining a few `smoke` iterations and resuming; the same command under
`torchrun --nproc_per_node 2`."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image
from ultradino_lab.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent/'shared'/'datasets'
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
SMOKE = ['--preset', 'smoke', '--set', 'optim.epochs=1', '--set', 'train.official_epoch_length=3', '--set', 'optim.warmup_epochs=0',
         '--set', 'optim.freeze_last_layer_epochs=0', '--set', 'data.splits=null', '--precision', 'fp32', '-q']

pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py


def command() -> list:
    "The console script next to this Python, else `python -m ultradino_lab.cli` (same `main`)."
    exe = Path(sys.executable).with_name('ultradino-lab')
    return [str(exe)] if exe.exists() else [sys.executable, '-m', 'ultradino_lab.cli']


def run(capsys, *args):
    "main(args) in this process: (exit code, stdout, stderr)."
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope='module')
def hc18_small(tmp_path_factory):
    "40 HC18 dev images as a manifest file (cheap to pretrain on)."
    from ultradino_lab.adapters import manifest_from_shared
    from ultradino_lab.manifests import write_manifest
    df = manifest_from_shared('hc18')
    return write_manifest(df[df.split == 'dev_train'].head(40), tmp_path_factory.mktemp('m')/'hc18_40.csv')


def test_every_subcommand_has_help_with_examples(capsys):
    code, out, _ = run(capsys, '--help')
    assert code == EXIT_OK and 'exit codes:' in out and '130' in out
    subs = build_parser()._subparsers._group_actions[0].choices
    assert set(subs) == {'settings', 'manifest', 'pretrain', 'benchmark', 'report', 'pipeline', 'demo', 'docs', 'bench'}
    actions = subs['manifest']._subparsers._group_actions[0].choices
    assert set(actions) == {'folder', 'hc18', 'fetal-planes', 'shared', 'phantom', 'validate', 'stats'}
    for argv in [[s] for s in subs] + [['manifest', a] for a in actions]:
        code, out, err = run(capsys, *argv, '--help')
        assert code == EXIT_OK and out.startswith(f"usage: ultradino-lab {' '.join(argv)}"), argv
        assert 'examples:' in out and 'ultradino-lab ' + argv[0] in out.split('examples:')[1], argv


def test_exit_codes_from_the_console_process(tmp_path, hc18_small):
    def cli(*args):
        return subprocess.run(command() + [str(a) for a in args], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    r = cli('--version')
    assert r.returncode == EXIT_OK and r.stdout.startswith('ultradino_lab ')
    # bad input: code 1, one line, no traceback
    for args, msg in [(['pretrain', '--manifest', tmp_path/'missing.csv'], f"Manifest {tmp_path/'missing.csv'} does not exist."),
                      (['manifest', 'validate', tmp_path/'missing.csv'], f"Manifest {tmp_path/'missing.csv'} does not exist."),
                      (['report', tmp_path/'no_run'], 'does not exist')]:
        r = cli(*args)
        assert r.returncode == EXIT_ERROR, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr, r.stderr
        assert r.stderr.startswith('ultradino-lab: error: ') and msg in r.stderr, r.stderr
    # a bad config value: one message naming the key, still code 1
    r = cli('pretrain', '--manifest', hc18_small, '--preset', 'smoke', '--set', 'optim.epochs=zero')
    assert r.returncode == EXIT_ERROR and 'optim.epochs' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    # usage: code 2
    for args in (['pretrian'], ['manifest', 'validate'], ['benchmark', '--shots', 'x']):
        r = cli(*args)
        assert r.returncode == EXIT_USAGE and 'usage:' in r.stderr, (args, r.stderr)


def test_manifests_built_validated_and_summarised_on_shared_data(tmp_path, capsys):
    # the official FETAL_PLANES_DB layout (metadata CSV + image folder): 160 of its 12,400 images are here
    code, out, err = run(capsys, 'manifest', 'fetal-planes', SHARED/'fetal_planes', '--images-dir', 'images', '--missing-images', 'drop',
                         '--dataset', 'fetal_planes', '-o', tmp_path/'fp.csv')
    assert code == EXIT_OK and '160 rows' in out, err
    fp = pd.read_csv(tmp_path/'fp.csv')
    assert set(fp.split) == {'train', 'val', 'test'} and fp.label.nunique() == 6
    assert fp.groupby('group').split.nunique().max() == 1                       # no patient on two sides
    code, out, err = run(capsys, 'manifest', 'validate', tmp_path/'fp.csv', '-q')
    assert code == EXIT_OK and 'no problems' in out, err
    # a folder (a dataset root name from the lab settings, one sub-folder of it)
    code, out, err = run(capsys, 'manifest', 'folder', 'hc18', '--under', 'images/dev', '-o', tmp_path/'dev.csv')
    assert code == EXIT_OK and '751 rows' in out and 'unlabeled 751' in out, err
    assert run(capsys, 'manifest', 'folder', 'hc18', '--under', 'images/dev', '-o', tmp_path/'dev.csv')[0] == EXIT_ERROR   # no silent overwrite
    # every defect listed, exit 1
    bad = pd.read_csv(tmp_path/'dev.csv')
    bad.loc[2, 'path'] = 'images/dev/no_such.png'
    bad.loc[7, 'path'] = bad.loc[6, 'path']
    bad.loc[9, 'dataset'] = 'nowhere'
    bad.to_csv(tmp_path/'bad.csv', index=False)
    code, out, err = run(capsys, 'manifest', 'validate', tmp_path/'bad.csv', '--check-images', 'header', '-q', '--problems-csv', tmp_path/'p.csv')
    assert code == EXIT_ERROR
    for s in ('row 2', 'missing_file', 'row 7', 'duplicate_path', 'row 9', 'unknown_dataset', '3 problem(s)'): assert s in err, (s, err)
    assert sorted(pd.read_csv(tmp_path/'p.csv').check) == ['duplicate_path', 'missing_file', 'unknown_dataset']
    # statistics of a seeded sample, checked against numpy on the same images
    code, out, err = run(capsys, 'manifest', 'stats', tmp_path/'dev.csv', '--max-images', 30, '--num-workers', 0, '-o', tmp_path/'s.json', '-q')
    assert code == EXIT_OK, err
    s = json.loads((tmp_path/'s.json').read_text())
    rows = pd.read_csv(tmp_path/'dev.csv').sample(n=30, random_state=0)
    px = np.concatenate([np.asarray(Image.open(SHARED/'hc18'/p).convert('L'), np.float64).ravel() / 255 for p in rows.path])
    assert s['n_images'] == 30 and s['mean'] == pytest.approx(px.mean(), abs=1e-9) and s['std'] == pytest.approx(px.std(), abs=1e-9)
    assert f"mean {s['mean']:.6f}" in out


def test_pretrain_smoke_then_resume(tmp_path, capsys, hc18_small):
    run_dir = tmp_path/'run'
    code, out, err = run(capsys, 'pretrain', *SMOKE, '--manifest', hc18_small, '--run-dir', run_dir, '--stop-at-iteration', 2)
    assert code == EXIT_OK, err
    assert f'pretrain stopped: iteration 2 of 3; run folder {run_dir}; checkpoint' in out
    code, out, err = run(capsys, 'pretrain', *SMOKE, '--manifest', hc18_small, '--run-dir', run_dir)
    assert code == EXIT_OK and f"pretrain finished: iteration 3 of 3; run folder {run_dir}; backbone {run_dir/'backbone.safetensors'}" in out, err
    events = [json.loads(l) for l in (run_dir/'metrics.jsonl').read_text().splitlines()]
    assert [e['event'] for e in events if e['kind'] == 'event'] == ['start', 'stopped', 'resume', 'finished']
    assert [e['iteration'] for e in events if e['kind'] == 'train'] == [1, 2, 3]
    import yaml
    cfg = yaml.safe_load((run_dir/'config.yaml').read_text())
    assert cfg['train']['precision'] == 'fp32' and cfg['model']['depth'] == 2 and cfg['derived']['total_iterations'] == 3
    # a changed setting cannot resume this run: code 1 and the difference named
    code, out, err = run(capsys, 'pretrain', *SMOKE, '--manifest', hc18_small, '--run-dir', run_dir, '--set', 'optim.base_lr=0.01')
    assert code == EXIT_ERROR and 'optim.base_lr' in err and 'different config' in err


@pytest.mark.skipif(shutil.which('torchrun', path=str(Path(sys.executable).parent)) is None, reason='torchrun not installed')
def test_pretrain_command_under_torchrun(tmp_path, hc18_small):
    run_dir = tmp_path/'ddp'
    torchrun = shutil.which('torchrun', path=str(Path(sys.executable).parent))
    r = subprocess.run([torchrun, '--standalone', '--nproc_per_node', '2', '-m', 'ultradino_lab.cli', 'pretrain', *SMOKE,
                        '--manifest', str(hc18_small), '--run-dir', str(run_dir), '--set', 'train.batch_size_per_gpu=2',
                        '--set', 'dino.koleo_loss_weight=0'],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.count('pretrain finished: iteration 3 of 3') == 1           # rank 0 reports, rank 1 is silent
    start = json.loads((run_dir/'metrics.jsonl').read_text().splitlines()[0])
    assert start['event'] == 'start' and start['world_size'] == 2
    assert (run_dir/'backbone.safetensors').is_file()


def test_pipeline_subcommand_finds_the_notebooks(capsys, tmp_path, monkeypatch):
    code, out, _ = run(capsys, 'pipeline', '--list')
    assert code == EXIT_OK and f"pipelines: {ROOT/'nbs'/'pipelines'}" in out and 'pretrain.ipynb' in out
    code, _, err = run(capsys, 'pipeline', 'pretrain')
    assert code == EXIT_ERROR and 'give the run folder' in err
    monkeypatch.setenv('ULTRADINO_PIPELINES', str(tmp_path))
    code, _, err = run(capsys, 'pipeline', '--list')
    assert code == EXIT_ERROR and 'ULTRADINO_PIPELINES' in err and 'missing pretrain.ipynb' in err
    code, out, _ = run(capsys, 'settings')
    assert code == EXIT_OK and 'dataset hc18' in out and 'pipelines' in out and '(not found)' in out
