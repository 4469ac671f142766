"""The offline docs site in a real browser: Debian's headless Chromium (Playwright), the site served on 127.0.0.1.

One walk over the site (one browser, one page) starting at index.html and following the navigation: every page
loads with HTTP 200, without console errors or uncaught exceptions, renders its title and a non-blank screenshot,
and requests nothing outside 127.0.0.1 (such requests are aborted and recorded). Every link in the navigation and
every local link in the pages resolves (HTTP 200 from the local server). The site is the one test_docs.py checks
statically (built once per session by `browser.docs_site`)."""
import posixpath, re
from urllib.parse import urlsplit

import pytest

from browser import block_external, chromium, docs_site, need_chromium, nonblank, page_errors, serve

SECTION_ORDER = ['Home', 'Tutorials', 'Library', 'Pipelines', 'Explore', 'Performance']
NAV_JS = "els => els.map(e => [e.getAttribute('href'), e.href, e.textContent.trim()])"


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    need_chromium()
    return docs_site(tmp_path_factory)


def _page_of(url, base):
    "The site path of a local URL (`tutorials/x.html`), or None for an outside or non-page link."
    u = urlsplit(url)
    if not url.startswith(base): return None
    path = u.path[len(urlsplit(base).path):] or 'index.html'
    return path if path.endswith('.html') else None


@pytest.fixture(scope='module')
def walk(site):
    "Visit every page reachable through the navigation; record what each one did."
    res = dict(pages={}, links={}, tabs=[], search=None)
    with chromium() as browser, serve(site) as base:
        ctx = browser.new_context(viewport={'width': 1280, 'height': 900})
        res['blocked'] = block_external(ctx)
        page = ctx.new_page()
        errors = page_errors(page)
        todo, seen = ['index.html'], {'index.html'}
        while todo:
            path = todo.pop(0)
            errors.clear()
            resp = page.goto(base + path, wait_until='load')
            nav = page.eval_on_selector_all('nav.md-nav--primary a.md-nav__link[href], .md-tabs a[href]', NAV_JS)
            body = page.eval_on_selector_all('article a[href]', NAV_JS)
            if path == 'index.html':
                res['tabs'] = page.eval_on_selector_all('.md-tabs__link', 'els => els.map(e => e.textContent.trim())')
            res['pages'][path] = dict(
                status=resp.status if resp else None, errors=list(errors), nonblank=nonblank(page.screenshot()),
                h1=(page.text_content('article h1') or '').strip().rstrip('¶').strip() if page.query_selector('article h1') else '',
                title=page.title(), n_nav=len(nav))
            for href, absolute, _ in nav + body:   # local links, to check once each
                if href and not href.startswith(('#', 'mailto:', 'javascript:')) and absolute.startswith(base):
                    res['links'].setdefault(urlsplit(absolute)._replace(fragment='').geturl(), set()).add(path)
            for _, absolute, _ in nav:             # pages to visit: the navigation's
                if (p := _page_of(absolute, base)) and p not in seen: seen.add(p); todo.append(p)
        # every local link once, through the browser context's HTTP client (same origin, no rendering)
        res['status'] = {url: ctx.request.get(url).status for url in sorted(res['links'])}
        # search works offline: the worker and the index are local files
        page.goto(base + 'index.html', wait_until='load')
        page.fill('input.md-search__input', 'load_settings')
        try:
            page.wait_for_selector('.md-search-result__item a[href]', timeout=15000)
            res['search'] = page.eval_on_selector_all('.md-search-result__item a[href]', 'els => els.map(e => e.getAttribute("href"))')
        except Exception as e: res['search'] = f'no results: {e}'
        res['errors_search'] = list(errors)
        res['requests'] = list(base.requests)
        ctx.close()
    return res


def test_every_page_is_reached_and_loads(site, walk):
    files = {p.relative_to(site).as_posix() for p in site.rglob('*.html') if p.name != '404.html'}
    assert len(files) >= 20
    missing = sorted(files - set(walk['pages']))
    assert not missing, f'pages not reachable through the navigation: {missing}'
    bad = {p: r['status'] for p, r in walk['pages'].items() if r['status'] != 200}
    assert not bad, bad
    for p, r in walk['pages'].items():
        assert r['h1'] and r['title'].startswith(r['h1'][:20]), (p, r['h1'], r['title'])   # the page's own title rendered
        assert r['n_nav'] >= len(files), (p, r['n_nav'])                                    # the whole navigation on every page


def test_no_console_errors(walk):
    errs = {p: r['errors'] for p, r in walk['pages'].items() if r['errors']}
    assert not errs, errs
    assert not walk['errors_search'], walk['errors_search']


def test_nothing_from_the_web(walk):
    assert not walk['blocked'], f"pages requested outside 127.0.0.1: {sorted(set(walk['blocked']))[:10]}"


def test_screenshots_not_blank(walk):
    blank = [p for p, r in walk['pages'].items() if not r['nonblank']]
    assert not blank, blank


def test_links_resolve(walk):
    bad = {url: (st, sorted(walk['links'][url])[:3]) for url, st in walk['status'].items() if st != 200}
    assert not bad, bad
    assert len(walk['status']) >= len(walk['pages'])
    failed = [(p, s) for p, s in walk['requests'] if s != 200 and not p.startswith('/favicon')]
    assert not failed, f'the server answered non-200 while browsing: {failed[:10]}'


def test_navigation_sections(site, walk):
    tabs = walk['tabs']
    known = [t for t in tabs if t in SECTION_ORDER]
    assert known == [t for t in SECTION_ORDER if t in tabs], tabs                 # in the documented order
    assert {'Home', 'Library'} <= set(tabs), tabs
    for folder, section in [('tutorials', 'Tutorials'), ('pipelines', 'Pipelines'), ('explore', 'Explore')]:
        if (site/folder).is_dir(): assert section in tabs, (section, tabs)
    if (site/'performance.html').exists(): assert 'Performance' in tabs, tabs


def test_search_works_offline(walk):
    hits = walk['search']
    assert isinstance(hits, list) and hits, hits
    assert any(urlsplit(h).path.endswith('/settings.html') and urlsplit(h).fragment == 'load_settings' for h in hits), hits[:5]
