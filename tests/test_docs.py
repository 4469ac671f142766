"""The offline docs site (`make docs`): built from every notebook under nbs/, without Quarto, and whole.

The site is built once per session into a temporary folder (the project's own `_site/` and `_docsite/` are left
alone; `browser.docs_site`, shared with test_browser_docs.py); the notebooks' list is computed here from nbs/,
independently of `ultradino_lab.docsite`."""
import posixpath, re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'


def notebooks():
    "Every notebook that should get a page: nbdev skips files and folders whose names start with `_` or `.`."
    return sorted(p.relative_to(NBS).as_posix() for p in NBS.rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(NBS).parts))


def page_of(nb):
    "nbdev's page name: `01_settings.ipynb` -> `settings.html`, `tutorials/02_x.ipynb` -> `tutorials/x.html`."
    d, name = posixpath.split(nb)
    return posixpath.join(d, re.sub(r'^\d+[a-zA-Z0-9]*_', '', name.lower())[:-len('.ipynb')] + '.html')


class _Page(HTMLParser):
    "The links (href/src) and element ids of one HTML page."
    def __init__(self):
        super().__init__(); self.links, self.ids, self.external = [], set(), []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get('id'): self.ids.add(a['id'])
        if tag == 'a' and a.get('name'): self.ids.add(a['name'])
        for k in ('href', 'src'):
            if a.get(k): self.links.append(a[k])
        # what the browser fetches by itself must be local: scripts, stylesheets, images, fonts
        fetched = tag in ('script', 'img', 'iframe', 'source') or (tag == 'link' and re.search(
            r'stylesheet|preload|icon|manifest', a.get('rel') or ''))
        url = (a.get('src') or a.get('href')) if fetched else None
        if url and re.match(r'^(https?:)?//', url): self.external.append(f'<{tag} {url}>')


def parse(path):
    p = _Page(); p.feed(path.read_text(encoding='utf-8')); return p


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    from browser import docs_site   # built once per session, shared with the browser test (test_browser_docs.py)
    out = docs_site(tmp_path_factory)
    assert (out/'index.html').is_file() and out.name == 'site'
    return out


@pytest.fixture(scope='module')
def pages(site):
    return {p.relative_to(site).as_posix(): parse(p) for p in site.rglob('*.html') if p.name != '404.html'}


def test_every_notebook_has_a_page(site):
    nbs = notebooks()
    assert 'index.ipynb' in nbs and any(re.match(r'\d\d', n) for n in nbs)
    missing = [f'{nb} -> {page_of(nb)}' for nb in nbs if not (site/page_of(nb)).is_file()]
    assert not missing, f'notebooks without a page: {missing}'


def test_index_links_every_page(site, pages):
    hrefs = {urlsplit(h).path for h in pages['index.html'].links}
    missing = [page_of(nb) for nb in notebooks() if nb != 'index.ipynb' and page_of(nb) not in hrefs]
    assert not missing, f'index.html does not link to {missing}'
    # library notebooks in their numbered order in the navigation
    text = (site/'index.html').read_text()
    lib = [page_of(nb) for nb in notebooks() if re.match(r'^\d', nb)]
    pos = [text.index(f'href="{p}"') for p in lib]
    assert pos == sorted(pos), lib


def test_api_reference_from_show_doc(site, pages):
    import html as H
    html = H.unescape(re.sub(r'<[^>]+>', '', (site/'settings.html').read_text()))   # the text, highlighting removed
    assert '<title>Lab settings' in (site/'settings.html').read_text()
    assert 'Where the data lives on' in html                                    # ... and its > summary the description
    for name in ('load_settings', 'find_settings_file', 'describe_settings', 'labsettings'):
        assert name in pages['settings.html'].ids, name                          # show_doc headings, Pandoc-style ids
    assert 'Read the lab settings from' in html                                  # docstring
    assert 'a settings.ini; default:' in html                                    # docments (parameter comments)
    assert 'Exported source' in html and 'def load_settings' in html             # the code under its documentation
    assert 'test_eq' in html                                                      # examples are shown
    assert '#| export' not in html and 'default_exp' not in html                 # directives are not


def test_no_broken_local_links(site, pages):
    broken = []
    for page, p in pages.items():
        for link in p.links:
            u = urlsplit(link)
            if u.scheme or link.startswith(('//', 'mailto:', 'data:', 'javascript:')): continue
            if not u.path:   # same-page anchor
                if u.fragment and u.fragment not in p.ids and not u.fragment.startswith('__'): broken.append(f'{page}: {link}')
                continue
            target = posixpath.normpath(posixpath.join(posixpath.dirname(page), unquote(u.path)))
            f = site/target
            if target.startswith('..') or not (f.is_file() or (f.is_dir() and (f/'index.html').is_file())):
                broken.append(f'{page}: {link}'); continue
            if u.fragment and target in pages and u.fragment not in pages[target].ids:
                broken.append(f'{page}: {link} (no such anchor)')
    assert not broken, 'broken links:\n' + '\n'.join(broken)


def test_offline(site, pages):
    ext = {f'{page}: {e}' for page, p in pages.items() for e in p.external}
    assert not ext, f'pages load files from the web: {sorted(ext)[:10]}'
    assert 'fonts.googleapis' not in (site/'index.html').read_text()
    assert (site/'search'/'search_index.js').is_file()                           # search works from file://


def test_build_leaves_the_repo_clean(site):
    import subprocess
    st = subprocess.run(['git', 'status', '--porcelain', '--ignored=no', '--', 'nbs', '.'], cwd=ROOT,
                        capture_output=True, text=True).stdout
    generated = [l for l in st.splitlines() if re.search(r'(^|/)(mkdocs\.yml|_docsite|_site|_proc|sidebar\.yml)(/|$)', l[3:].strip('"'))]
    assert not generated, generated


def test_tutorials_pipelines_and_explorers(site):
    import json
    tutorials = [nb for nb in notebooks() if nb.startswith('tutorials/')]
    assert len(tutorials) >= 4, tutorials
    for nb in notebooks():
        if not nb.startswith(('tutorials/', 'pipelines/', 'explore/')): continue
        html = (site/page_of(nb)).read_text()
        assert '<h1' in html and '!ultradino-lab' not in html, nb           # shell cells are shown as shell commands
        cells = json.loads((NBS/nb).read_text())['cells']
        if any('parameters' in c.get('metadata', {}).get('tags', []) for c in cells):   # papermill's parameters cell
            assert '<p class="admonition-title">Parameters</p>' in html and f'papermill nbs/{nb} out.ipynb' in html, nb


def _commands(prog):
    "(notebook, argv) of every `prog ...` command line in the tutorials' code cells and Markdown code blocks."
    import json, shlex
    out = []
    for nb in notebooks():
        if not nb.startswith('tutorials/'): continue
        for c in json.loads((NBS/nb).read_text())['cells']:
            src = re.sub(r'\\\n\s*', ' ', ''.join(c['source']))               # shell line continuations
            for line in src.splitlines():
                line = line.strip().lstrip('#').strip().lstrip('!')
                m = re.search(rf'(?:^|\s|\$\(which ){re.escape(prog)}\)?\s+(.*)$', line)
                if not m or '`' in line or m.group(1).startswith('...'): continue
                out.append((nb, shlex.split(re.split(r'\s+#\s', m.group(1))[0])))
    return out


def test_tutorial_commands_parse():
    "Every `ultradino-lab` command the tutorials show is accepted by the real command line, and papermill's `-p` names exist."
    import papermill as pm
    from ultradino_lab.cli import build_parser
    parser, bad = build_parser(), []
    cmds = _commands('ultradino-lab')
    assert len(cmds) >= 10, cmds
    params = lambda name: set(pm.inspect_notebook(NBS/'pipelines'/f'{name}.ipynb'))
    for nb, argv in cmds:
        try: parser.parse_args(argv)
        except SystemExit: bad.append((nb, argv)); continue
        if argv[0] == 'pipeline':
            keys = [argv[i + 1] for i, a in enumerate(argv) if a in ('-p', '--parameter')]
            if unknown := set(keys) - params(argv[1]): bad.append((nb, argv, unknown))
    for nb, argv in _commands('papermill'):
        if not (argv and argv[0].endswith('.ipynb')): continue               # prose that mentions papermill
        keys = [argv[i + 1] for i, a in enumerate(argv) if a == '-p']
        if unknown := set(keys) - set(pm.inspect_notebook(ROOT/argv[0])): bad.append((nb, argv, unknown))
    assert not bad, bad
