"""Shared helpers for the browser tests: Debian's headless Chromium driven by Playwright, pages served on 127.0.0.1.

Nothing is downloaded: Playwright's Python package launches the system browser (`/usr/bin/chromium`, installed by
`.ci/run` with apt). Tests that need a browser skip when there is none (`need_chromium()`).

    from browser import chromium, serve, page_errors, block_external, nonblank
    with chromium() as b, serve(site) as url:
        page = b.new_page(); errors = page_errors(page); outside = block_external(page)
        page.goto(url + 'index.html'); assert nonblank(page.screenshot()) and not errors and not outside
"""
import io, os, shutil, socket, threading, time
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM = os.environ.get('ULTRADINO_CHROMIUM', '/usr/bin/chromium')
ARGS = ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
        '--disable-component-update', '--disable-sync', '--no-first-run', '--no-default-browser-check',
        '--disable-features=Translate,MediaRouter,OptimizationHints']
LOCAL_HOSTS = {'127.0.0.1', 'localhost'}


def need_chromium():
    "Skip the calling test when the system Chromium or Playwright's Python package is missing."
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f'no Chromium at {CHROMIUM} (apt-get install chromium, or set ULTRADINO_CHROMIUM)')
    pytest.importorskip('playwright.sync_api')


@contextmanager
def chromium(headless=True, # no window
             **kw,          # more `BrowserType.launch` arguments
            ):
    "A Playwright `Browser` on the system Chromium (never a downloaded one), closed afterwards."
    need_chromium()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=headless, args=ARGS + kw.pop('args', []), **kw)
        try: yield b
        finally: b.close()


class _Quiet(SimpleHTTPRequestHandler):
    "A static file handler that logs nothing and records each request's path and status on its server."
    def log_message(self, *a): pass
    def log_request(self, code='-', size='-'):
        self.server.requests.append((self.path, int(code) if str(code).isdigit() else code))


def free_port() -> int:
    "A TCP port that is free on 127.0.0.1 now."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@contextmanager
def serve(folder, # the folder to serve
         ):
    "Serve `folder` over HTTP on 127.0.0.1 (a free port) in a thread; yields the base URL (ending in '/').\n\n"\
    "The server's `(path, status)` log is the yielded string's `.requests` attribute."
    folder = Path(folder)
    if not folder.is_dir(): raise FileNotFoundError(f'cannot serve {folder}: not a folder')
    srv = ThreadingHTTPServer(('127.0.0.1', 0), partial(_Quiet, directory=str(folder)))
    srv.daemon_threads = True
    srv.requests = []
    t = threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.1), daemon=True)
    t.start()
    try:
        url = _URL(f'http://127.0.0.1:{srv.server_address[1]}/'); url.requests = srv.requests
        yield url
    finally:
        srv.shutdown(); srv.server_close(); t.join(5)


class _URL(str):
    "A base URL that also carries the server's request log."
    requests: list


def page_errors(page, # a Playwright `Page`
               ) -> list:
    "Collect the page's console errors and uncaught exceptions (from now on) into the returned list."
    errs = []
    def _console(m):
        if m.type == 'error':
            loc = m.location or {}
            errs.append(f"console: {m.text} ({loc.get('url', '')}:{loc.get('lineNumber', '')})")
    page.on('console', _console)
    page.on('pageerror', lambda e: errs.append(f'pageerror: {e}'))
    return errs


def is_local(url:str) -> bool:
    "Whether the browser may fetch `url`: 127.0.0.1/localhost, or an inline (data:, blob:, about:) URL."
    u = urlsplit(url)
    return u.scheme in ('data', 'blob', 'about') or (u.scheme in ('http', 'https', 'ws', 'wss') and u.hostname in LOCAL_HOSTS)


def block_external(target, # a Playwright `Page` or `BrowserContext`
                  ) -> list:
    "Abort every request that does not go to 127.0.0.1; the returned list records their URLs (a test asserts it empty)."
    blocked = []
    def _route(route):
        if is_local(route.request.url): route.continue_()
        else: blocked.append(route.request.url); route.abort()
    target.route('**/*', _route)
    # websockets are not routed by `route`: watch them too
    if hasattr(target, 'on'):
        try: target.on('websocket', lambda ws: None if is_local(ws.url) else blocked.append(ws.url))
        except Exception: pass
    return blocked


def nonblank(png:bytes,          # a screenshot (PNG bytes)
             min_fraction=0.002,  # at least this share of pixels differs from the most common colour
             min_colors=3,        # and at least this many distinct colours
            ) -> bool:
    "Whether a screenshot shows something: not one flat colour (a blank or failed page)."
    from PIL import Image
    im = Image.open(io.BytesIO(png)).convert('RGB')
    im.thumbnail((640, 640))   # enough to see text; fast
    colors = im.getcolors(maxcolors=1 << 20) or []
    if len(colors) < min_colors: return False
    top = max(c for c, _ in colors)
    return 1 - top / (im.width * im.height) >= min_fraction


ROOT = Path(__file__).resolve().parents[1]
_SITES = {}

def docs_site(tmp_path_factory, # pytest's session `tmp_path_factory`
             ) -> Path:
    "The project's offline docs site, built once per test session into a temporary folder (`_site/` is left alone)."
    key = id(tmp_path_factory)
    if key not in _SITES:
        from ultradino_lab.docsite import build_docs
        d = tmp_path_factory.mktemp('docs')
        t0 = time.time()
        _SITES[key] = build_docs(out=d/'site', build_dir=d/'build', root=ROOT, quiet=True)
        print(f'docs site built in {time.time() - t0:.0f} s')
    return _SITES[key]
