"""An explorer notebook in a real JupyterLab: started on 127.0.0.1, opened in Debian's headless Chromium, run with
Run > Run All Cells, and its ipywidgets explorer and plotly figure appear.

The server runs from a temporary root holding a copy of the notebook (nothing is written into the repository), with
its runtime, config, data, settings and workspace folders in the temporary folder too (nothing touches ~/.jupyter).
The notebook is saved from the browser at the end, and the saved file is checked: every code cell ran, none raised."""
import json, os, re, secrets, shutil, signal, subprocess, sys, time
from contextlib import contextmanager
import urllib.request
from pathlib import Path

import pytest

from browser import block_external, chromium, free_port, need_chromium, nonblank, page_errors

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT/'nbs'/'explore'/'embeddings.ipynb'
LAB_TIMEOUT = 60      # s: the server answers
RUN_TIMEOUT = 120     # s: the notebook's cells, from Run All to the last output (2 busy CPU cores)
SAVE_TIMEOUT = 45     # s: File > Save Notebook reaches the disk
NOT_BUSY_JS = "() => ![...document.querySelectorAll('.jp-InputArea-prompt')].some(e => e.textContent.includes('*'))"
KERNEL_IDLE_JS = """() => {
  const name = document.querySelector('.jp-NotebookPanel .jp-Toolbar-kernelName');
  const bar = document.querySelector('#jp-main-statusbar');
  return !!name && !/No Kernel/i.test(name.textContent) && !!bar && /\\|\\s*Idle/.test(bar.textContent);
}"""


def _wait_http(url, proc, log, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None: pytest.fail(f'jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}')
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: pass
        time.sleep(0.5)
    pytest.fail(f'jupyter lab did not answer at {url} in {timeout} s:\n{log.read_text()[-3000:]}')


@contextmanager
def jupyter_lab(tmp_path):
    "A JupyterLab server on 127.0.0.1 whose root is `tmp_path/root`; yields (base URL, token, root); stopped afterwards."
    need_chromium()
    root = tmp_path/'root'; root.mkdir()
    jup = tmp_path/'jupyter'
    env = {**os.environ, 'JUPYTER_RUNTIME_DIR': str(jup/'runtime'), 'JUPYTER_CONFIG_DIR': str(jup/'config'),
           'JUPYTER_DATA_DIR': str(jup/'data'), 'JUPYTERLAB_SETTINGS_DIR': str(jup/'settings'),
           'JUPYTERLAB_WORKSPACES_DIR': str(jup/'workspaces'), 'IPYTHONDIR': str(jup/'ipython'),
           'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1', 'MPLBACKEND': 'Agg'}
    # no news or update checks (they would ask the web, and their notification could cover the notebook)
    notif = jup/'settings'/'@jupyterlab'/'apputils-extension'/'notification.jupyterlab-settings'
    notif.parent.mkdir(parents=True); notif.write_text(json.dumps({'fetchNews': 'false', 'checkForUpdates': False}))
    token, port = secrets.token_hex(16), free_port()
    log = tmp_path/'lab.log'
    cmd = [sys.executable, '-m', 'jupyter', 'lab', '--no-browser', '--ip', '127.0.0.1', '--port', str(port),
           '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root}',
           '--LabApp.news_url=None', '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate',
           '--LabApp.extension_manager=readonly', '--ServerApp.terminals_enabled=False'
           ] + (['--allow-root'] if hasattr(os, 'geteuid') and os.geteuid() == 0 else [])
    with open(log, 'w') as f:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    base = f'http://127.0.0.1:{port}'
    try:
        _wait_http(f'{base}/api/status?token={token}', proc, log, LAB_TIMEOUT)
        yield base, token, root
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)       # jupyter's own shutdown (kernels too) on SIGINT... twice
            time.sleep(0.5)
            if proc.poll() is None: os.killpg(proc.pid, signal.SIGINT)
            try: proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL); proc.wait(5)


@pytest.fixture
def lab(tmp_path):
    with jupyter_lab(tmp_path) as x: yield x


def _code_cells(path):
    return [c for c in json.loads(Path(path).read_text())['cells'] if c['cell_type'] == 'code' and ''.join(c['source']).strip()]


def run_in_lab(base, token, root, nb, widget_sel, figure_sel='.js-plotly-plot'):
    "Open `root/nb` in JupyterLab, Run All Cells from the menu, wait for the widget and the figure; returns what happened."
    out = {}
    with chromium() as browser:
        ctx = browser.new_context(viewport={'width': 1400, 'height': 1000})
        blocked = block_external(ctx)
        page = ctx.new_page()
        errors = page_errors(page)
        try:
            page.goto(f'{base}/lab/tree/{nb}?token={token}', wait_until='domcontentloaded')
            page.wait_for_selector('.jp-NotebookPanel .jp-Cell', timeout=LAB_TIMEOUT * 1000)
            page.wait_for_function(KERNEL_IDLE_JS, timeout=LAB_TIMEOUT * 1000)   # a kernel started, and idle
            page.get_by_role('menuitem', name='Run', exact=True).click()
            page.get_by_role('menuitem', name='Run All Cells', exact=True).click()
            t0 = time.time()
            page.wait_for_selector(f'.jp-OutputArea-output {widget_sel}', state='visible', timeout=RUN_TIMEOUT * 1000)
            page.wait_for_selector(f'.jp-OutputArea-output {figure_sel}', state='visible', timeout=RUN_TIMEOUT * 1000)
            page.wait_for_function(NOT_BUSY_JS, timeout=RUN_TIMEOUT * 1000)       # every cell done: no '[*]' prompt
            out['seconds'] = time.time() - t0
            out['n_widgets'] = page.locator(f'.jp-OutputArea-output {widget_sel}').count()
            out['n_figures'] = page.locator(f'.jp-OutputArea-output {figure_sel}').count()
            fig = page.locator(f'.jp-OutputArea-output {figure_sel}').first
            fig.scroll_into_view_if_needed()
            out['figure_png'] = fig.screenshot()
            out['n_points'] = page.evaluate(f"() => document.querySelectorAll('.jp-OutputArea-output {figure_sel} .point').length")
            out['error_outputs'] = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
            # the widget talks to the kernel: pick another value in its first drop-down, and the figure's legend follows
            legend_js = f"() => [...document.querySelectorAll('.jp-OutputArea-output {figure_sel} .legendtext')].map(e => e.textContent)"
            out['legend'] = page.evaluate(legend_js)
            select = page.locator(f'.jp-OutputArea-output {widget_sel} select').first
            if select.count():
                opts = [o for o in select.locator('option').all_inner_texts() if o != select.input_value()]
                choice = 'split' if 'split' in opts else opts[0]
                select.select_option(label=choice)
                page.wait_for_function(f"before => JSON.stringify(({legend_js})()) !== JSON.stringify(before)",
                                       arg=out['legend'], timeout=RUN_TIMEOUT * 1000)
                out['choice'], out['legend_after'] = choice, page.evaluate(legend_js)
            page.get_by_role('menuitem', name='File', exact=True).click()   # File > Save Notebook: the file is checked after
            page.get_by_role('menuitem', name=re.compile(r'^Save( Notebook)?\b')).first.click()
            t1 = time.time()
            while time.time() - t1 < SAVE_TIMEOUT and not all(c.get('execution_count') for c in _code_cells(root/nb)): time.sleep(0.5)
        finally:
            page.screenshot(path=str(root.parent/'lab.png'))   # what the page showed last (pytest's tmp folder), for a post-mortem
            out['errors'], out['blocked'] = list(errors), list(blocked)
            ctx.close()
    return out


def _check_saved(path):
    cells = _code_cells(path)
    assert cells
    not_run = [''.join(c['source'])[:60] for c in cells if not c.get('execution_count')]
    assert not not_run, f'cells that did not run: {not_run}'
    errs = [o for c in cells for o in c.get('outputs', []) if o.get('output_type') == 'error']
    assert not errs, [f"{o['ename']}: {o['evalue']}" for o in errs]


def test_explorer_notebook_in_jupyterlab(lab):
    base, token, root = lab
    assert NOTEBOOK.is_file(), f'{NOTEBOOK} is missing (the explorer notebooks are part of the project)'
    shutil.copy(NOTEBOOK, root/NOTEBOOK.name)
    res = run_in_lab(base, token, root, NOTEBOOK.name, widget_sel='.jupyter-widgets')
    assert res['n_widgets'] >= 1 and res['n_figures'] >= 1, res
    assert res['n_points'] >= 20, res['n_points']                                  # one point per image
    assert res.get('choice') == 'split' and {'train', 'test'} <= set(res['legend_after']), (res.get('choice'), res.get('legend_after'))
    assert nonblank(res['figure_png']), 'the plotly figure rendered blank'
    assert not res['blocked'], f"JupyterLab requested outside 127.0.0.1: {sorted(set(res['blocked']))[:10]}"
    assert not res['errors'], res['errors']                                         # browser console errors
    tracebacks = [t[:300] for t in res['error_outputs'] if 'Traceback' in t or 'Error' in t.split('\n')[0]]
    assert not tracebacks, tracebacks
    _check_saved(root/NOTEBOOK.name)
