"""The offline docs site (`make docs`): built from every notebook under nbs/, without Quarto, and whole.

The site is built once per session into a temporary folder (the project's own `_site/` and `_docsite/` are left
alone); the notebooks' list is computed here from nbs/, independently of `ultradino_lab.docsite`."""
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
    from ultradino_lab.docsite import build_docs
    d = tmp_path_factory.mktemp('docs')
    out = build_docs(out=d/'site', build_dir=d/'build', root=ROOT, quiet=True)
    assert out == d/'site'
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
    generated = [l for l in st.splitlines() if re.search(r'(mkdocs\.yml|_docsite|_site|_proc|sidebar\.yml)', l)]
    assert not generated, generated
