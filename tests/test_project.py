"""The project's own promises: README commands are the ones CI runs, settings point at the shared data."""
import re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_readme_commands_are_what_ci_runs():
    readme, ci = (ROOT/'README.md').read_text(), (ROOT/'.ci/run').read_text()
    install = "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'"
    assert install in readme and "make test" in readme
    assert "python3 -m venv .venv" in ci and ".venv/bin/pip install -q -e '.[dev]'" in ci and "make test" in ci

def test_settings_ini_is_the_labs_not_nbdevs():
    from ultradino_lab.settings import load_settings
    s = load_settings(ROOT/'settings.ini', env={})
    assert s.dataset_root('hc18').name == 'hc18'
    assert s.dataset_root('fetal_planes').name == 'fetal_planes'
    # nbdev reads pyproject.toml only; the header comment says so
    assert 'NOT nbdev' in (ROOT/'settings.ini').read_text().splitlines()[0]

def test_library_imports_without_notebooks():
    out = subprocess.run([sys.executable, '-c', 'import ultradino_lab.settings as s; print(s.describe_settings())'],
                         cwd='/', capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 'dataset hc18' in out.stdout

def test_readme_is_generated_from_index():
    from ultradino_lab.docsite import readme_markdown
    assert (ROOT/'README.md').read_text() == readme_markdown(ROOT), 'README.md is stale: run `make readme`'
