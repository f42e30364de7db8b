"""The labeling page (`falkit label`): one client's queue in the browser (issues 17, 23).

A Starlette app: GET / (the page), GET /api/queue (progress, the next sample, the asking
page's own answers), GET /image/<id> (a queued sample's PNG), POST /api/answer and POST
/api/undo. Every request carries the access token (`?token=...`, or the `X-Token` header);
missing: 401, wrong: 403. POSTs also carry the page's CSRF token in `X-CSRF-Token` (403
without it; derived from the access token, so a server restarted with the same token keeps
open pages working) and the page's annotator id in `X-Annotator` (400 without it): an
answer records who gave it (hashed) and an undo takes back only that page's answers. Bodies
over 4 KiB are refused (413), malformed JSON too (400); a Host header that is not one of
the served names is refused (400, against DNS rebinding); every response carries a
Content-Security-Policy, `frame-ancestors 'none'`, `nosniff`, `no-referrer` and
`Cache-Control: no-store`. The queue itself (validation, locking, atomic writes) is
falkit.labeling's.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import json
import re
import secrets
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from falkit import labeling

MAX_BODY = 4096  # bytes: an answer is {"id": 123, "label": 4}
ANNOTATOR = re.compile(r"[A-Za-z0-9_-]{16,64}")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
HEADERS = {  # on every response; the page's own CSP adds its script and style nonce
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY", "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer", "cache-control": "no-store",
}


def csrf_token(token: str) -> str:
    """The pages' CSRF token: a function of the access token (a restarted server with the
    same token accepts the pages it served before)."""
    return hmac.new(token.encode(), b"falkit label csrf", hashlib.sha256).hexdigest()[:32]


def annotator_tag(annotator: str) -> str:
    """What answers.json records of a page's annotator id (the id itself stays secret: a
    reader of the files cannot undo in that page's name)."""
    return "page:" + hashlib.sha256(annotator.encode()).hexdigest()[:16]


def served_hosts(host: str) -> set[str]:
    """The Host names a page served on `host` answers to: loopback, the address itself, and
    for a wildcard address this machine's names (any IP literal is accepted as well)."""
    import socket

    names = {*LOOPBACK, host.strip("[]")}
    if host in ("0.0.0.0", "::"):
        names |= {socket.gethostname(), socket.getfqdn()}
    return {n.lower() for n in names if n}


def _host_allowed(header: str, hosts: set[str]) -> bool:
    name = header.strip().lower()
    if name.startswith("["):  # [v6]:port
        name = name[1:name.find("]")] if "]" in name else ""
    elif name.count(":") == 1:
        name = name.split(":")[0]
    if name in hosts:
        return True
    try:
        ipaddress.ip_address(name)  # an address, not a name: DNS rebinding needs a name
        return "0.0.0.0" in hosts or "::" in hosts
    except ValueError:
        return False


class _Guard:
    """ASGI middleware: refuse foreign Host headers and oversized bodies, and add the
    security headers to every response."""

    def __init__(self, app, hosts: set[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if not _host_allowed(headers.get("host", ""), self.hosts):
            return await _plain(send, 400, "this page is not served under that host name")
        size = headers.get("content-length", "0")
        if not size.isdigit() or int(size) > MAX_BODY:
            return await _plain(send, 413, f"the request body is over {MAX_BODY} bytes")

        async def with_headers(message):
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k.encode(), v.encode()) for k, v in HEADERS.items()
                    if k.encode() not in have]
            await send(message)

        await self.app(scope, receive, with_headers)


async def _plain(send, status: int, text: str) -> None:
    body = json.dumps({"error": text}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *((k.encode(), v.encode()) for k, v in HEADERS.items())]})
    await send({"type": "http.response.body", "body": body})


def create_app(folder: Path, token: str, hosts: set[str] | None = None) -> Starlette:
    """The page for the queue in `folder`, guarded by `token`, answering to the Host names
    `hosts` (default: loopback's)."""
    folder = Path(folder)
    csrf = csrf_token(token)

    def guard(request: Request, post: bool = False) -> Response | None:
        given = request.query_params.get("token") or request.headers.get("x-token")
        if not given:
            return JSONResponse({"error": "the access token is missing"}, 401)
        if not secrets.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "wrong access token"}, 403)
        if post and not secrets.compare_digest(
                request.headers.get("x-csrf-token", "").encode(), csrf.encode()):
            return JSONResponse({"error": "missing or wrong CSRF token"}, 403)
        return None

    def who(request: Request, required: bool) -> str | None:
        given = request.headers.get("x-annotator", "")
        if ANNOTATOR.fullmatch(given):
            return annotator_tag(given)
        if required:
            raise labeling.QueueError("the X-Annotator header (the page's annotator id, "
                                      "16-64 letters, digits, - or _) is missing")
        return None

    def state(by: str | None) -> dict[str, Any]:
        s = labeling.progress(labeling.read_queue(folder), labeling.read_answers(folder), by)
        s["closed"] = (folder / labeling.CLOSED).exists()
        return s

    async def page(request: Request) -> Response:
        denied = guard(request)
        if denied:
            return denied
        nonce = secrets.token_urlsafe(16)
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
               "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
               "frame-ancestors 'none'")
        return HTMLResponse(_page(state(None), csrf, nonce),
                            headers={"content-security-policy": csp})

    async def queue(request: Request) -> Response:
        return guard(request) or JSONResponse(state(who(request, required=False)))

    async def image(request: Request) -> Response:
        denied = guard(request)
        if denied:
            return denied
        try:
            sid = labeling.sample_id(labeling.read_queue(folder), request.path_params["sample"])
        except labeling.QueueError as e:
            return JSONResponse({"error": str(e)}, e.status)
        return Response((folder / f"img_{sid}.png").read_bytes(), media_type="image/png")

    async def post(request: Request, action) -> Response:
        denied = guard(request, post=True)
        if denied:
            return denied
        try:
            body = await _json_body(request)
            by = who(request, required=True)
            result = action(body, by)
            result["closed"] = (folder / labeling.CLOSED).exists()
            return JSONResponse(result)
        except labeling.QueueError as e:
            return JSONResponse({"error": str(e)}, e.status)

    async def answer(request: Request) -> Response:
        return await post(request, lambda b, by: labeling.answer(folder, b.get("id"),
                                                                 b.get("label"), by))

    async def undo(request: Request) -> Response:
        return await post(request, lambda b, by: labeling.undo(folder, b.get("id"), by))

    app = Starlette(routes=[
        Route("/", page), Route("/api/queue", queue),
        Route("/image/{sample}", image),
        Route("/api/answer", answer, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
    ])
    app.add_middleware(_Guard, hosts=served_hosts("127.0.0.1") if hosts is None else hosts)
    return app


async def _json_body(request: Request) -> dict[str, Any]:
    """The POST's JSON object: over MAX_BODY bytes 413 (whatever Content-Length said),
    malformed or nested beyond reason 400."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise labeling.QueueError(f"the request body is over {MAX_BODY} bytes", 413)
    if not body:
        return {}
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise labeling.QueueError("the body is not JSON") from None
    if not isinstance(data, dict):
        raise labeling.QueueError("the body must be a JSON object")
    return data


def lan_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return None


def serve(folder: Path, host: str = "127.0.0.1", port: int = 8765,
          token: str | None = None, certfile: str | None = None,
          keyfile: str | None = None) -> None:
    """Serve the page until Ctrl-C; the URL (with the token) is printed once the port
    listens (and with a wildcard host, the URL others on the network open)."""
    import socket

    import uvicorn

    from falkit.errors import FalkitError

    token = token or labeling.new_token()
    app = create_app(folder, token, served_hosts(host))
    q = labeling.read_queue(folder)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise FalkitError(f"cannot listen on {host}:{port} ({e.strerror}); choose another "
                          "--port") from None
    sock.listen(128)
    config = uvicorn.Config(app, log_level="warning", ssl_certfile=certfile,
                            ssl_keyfile=keyfile)
    try:
        config.load()  # reads the certificate now: a bad one is a one-line error
    except (OSError, ValueError) as e:
        sock.close()
        raise FalkitError(f"cannot use --certfile/--keyfile: {e}") from None
    scheme = "https" if certfile else "http"
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    print(f"labeling client {q['client']}, cycle {q['cycle'] + 1}: "
          f"{len(labeling.read_answers(folder))} / {len(q['ids'])} answered")
    print(f"open {scheme}://{shown}:{port}/?token={token}", flush=True)
    if host in ("0.0.0.0", "::"):
        for name in dict.fromkeys(n for n in (lan_address(), socket.getfqdn()) if n):
            print(f"  from other machines: {scheme}://{name}:{port}/?token={token}")
    server = uvicorn.Server(config)
    server.run(sockets=[sock])


def _page(state: dict[str, Any], csrf: str, nonce: str) -> str:
    classes, keys = state["classes"], state["keys"]
    buttons = "".join(
        f'<button type="button" class="cls" tabindex="-1" data-label="{i}">'
        f'{"<kbd>" + html.escape(k) + "</kbd> " if k else ""}{html.escape(c)}</button>'
        for i, (c, k) in enumerate(zip(classes, keys, strict=True)))
    keyed = [k for k in keys if k]
    hint = f"<kbd>{keyed[0]}</kbd>–<kbd>{keyed[-1]}</kbd> choose a class" if keyed else ""
    filt = ('<input id="filter" type="search" autocomplete="off" placeholder="type to filter '
            'the classes (press /), Enter chooses the only match">'
            if len(classes) > 10 else "")
    title = f"falkit — label client {state['client']}, cycle {state['cycle'] + 1}"
    return (_HTML.replace("__NONCE__", nonce).replace("__CSRF__", csrf)
            .replace("__BUTTONS__", buttons).replace("__FILTER__", filt)
            .replace("__HINT__", hint)
            .replace("__STATE__", json.dumps(state).replace("<", "\\u003c"))
            .replace("__TITLE__", html.escape(title)))


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf" content="__CSRF__">
<title>__TITLE__</title>
<style nonce="__NONCE__">
 body { font-family: system-ui, sans-serif; max-width: 860px; margin: 1.5em auto;
        padding: 0 .8em; color: #222; }
 header { display: flex; justify-content: space-between; align-items: baseline; gap: 1em; }
 h2 { font-size: 1.25em; margin: .3em 0; }
 #progress { font-size: 1.4em; font-variant-numeric: tabular-nums; white-space: nowrap; }
 #bar { height: 6px; background: #eee; border-radius: 3px; margin: .5em 0 1em; }
 #bar div { height: 6px; background: #2a7; border-radius: 3px; width: 0; }
 #sample { text-align: center; }
 #img { image-rendering: pixelated; width: min(320px, 80vw); height: min(320px, 80vw);
        object-fit: contain; border: 1px solid #ccc; background: #fff; }
 #img.loading { opacity: .15; }
 #filter { display: block; width: 100%; box-sizing: border-box; font-size: 1em;
           padding: .4em .6em; margin: .8em 0 0; }
 #buttons { display: flex; flex-wrap: wrap; gap: .5em; justify-content: center;
            margin: 1em 0; }
 #controls { position: sticky; bottom: 0; background: #fff; padding: .6em 0;
             border-top: 1px solid #eee; display: flex; flex-wrap: wrap; gap: .5em;
             justify-content: center; align-items: center; }
 button { font-size: 1.05em; padding: .5em .9em; border: 1px solid #999; border-radius: 6px;
          background: #fafafa; cursor: pointer; touch-action: manipulation; }
 button:hover { background: #e8f4ee; }
 button.hidden { display: none; }
 button:disabled { opacity: .4; cursor: default; }
 kbd { font-family: monospace; background: #eee; border: 1px solid #bbb; border-radius: 3px;
       padding: 0 .3em; }
 #last { color: #333; }
 #done, #closed { display: none; text-align: center; font-size: 1.2em; margin-top: 2em; }
 #msg { color: #b00; min-height: 1.2em; text-align: center; }
 .hint { color: #666; text-align: center; font-size: .9em; }
 @media (max-width: 600px) { body { margin: .5em auto; } button { padding: .6em .8em; }
   .hint { display: none; } }
</style></head>
<body>
<header><h2>__TITLE__</h2><div id="progress"></div></header>
<div id="bar"><div></div></div>
<script id="state" type="application/json">__STATE__</script>
<div id="work">
 <div id="sample"><img id="img" alt="sample to label" data-sample=""></div>
 __FILTER__
 <div id="buttons">__BUTTONS__</div>
 <p class="hint">__HINT__; <kbd>u</kbd>: unsure (the sample goes back to the pool, it still
 counts against the budget); <kbd>Backspace</kbd>: undo this page's last answer.</p>
</div>
<div id="controls">
 <button type="button" id="unsure" tabindex="-1"><kbd>u</kbd> unsure</button>
 <span id="last"></span>
 <button type="button" id="undo" tabindex="-1" disabled><kbd>Backspace</kbd> undo</button>
</div>
<div id="msg" role="status"></div>
<div id="done">All samples of this queue are labeled. Run the same falkit command again
to continue the run.</div>
<div id="closed">The run has used this queue's answers: they can no longer change.</div>
<script nonce="__NONCE__">
const token = new URLSearchParams(location.search).get("token");
const csrf = document.querySelector('meta[name="csrf"]').content;
let annotator = sessionStorage.getItem("falkit-annotator");  // this tab's, across reloads
if (!annotator) {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  annotator = Array.from(b, x => x.toString(16).padStart(2, "0")).join("");
  sessionStorage.setItem("falkit-annotator", annotator);
}
const $ = id => document.getElementById(id);
const img = $("img"), filter = $("filter");
let state = JSON.parse($("state").textContent);
let busy = false, offline = false, shown = null;  // shown: the sample whose image is on screen
const OFFLINE = "The labeling server cannot be reached (stopped?). Every answer acknowledged " +
  "so far is saved. Start falkit label again with the same token (--token-file) and this " +
  "page reconnects by itself.";
function name(label) { return label === -1 ? "unsure" : state.classes[label]; }
function show(s) {
  state = s;
  $("progress").textContent = s.answered + " / " + s.total;
  $("bar").firstElementChild.style.width = (100 * s.answered / s.total) + "%";
  const mine = s.mine || [];
  const last = mine[mine.length - 1];
  $("last").textContent = last ? "your last answer: sample " + last.id + " \\u2192 " +
    name(last.label) : "";
  $("undo").disabled = !last || s.closed;
  const finished = s.next.length === 0 || s.closed;
  $("work").style.display = finished ? "none" : "block";
  $("unsure").style.display = finished ? "none" : "";
  $("done").style.display = s.next.length === 0 && !s.closed ? "block" : "none";
  $("closed").style.display = s.closed ? "block" : "none";
  if (finished) { shown = null; img.dataset.sample = ""; return; }
  const id = s.next[0];
  if (shown !== id && img.dataset.want !== String(id)) {
    shown = null;  // answers wait until the image on screen is this sample's
    img.dataset.sample = "";
    img.dataset.want = String(id);
    img.classList.add("loading");
    img.onload = () => {
      if (img.dataset.want !== String(id)) return;
      shown = id; img.dataset.sample = String(id); img.classList.remove("loading");
    };
    img.onerror = () => { if (img.dataset.want === String(id)) refresh(); };
    img.src = "/image/" + id + "?token=" + encodeURIComponent(token);
  }
}
function setOffline(on) {
  offline = on;
  $("msg").textContent = on ? OFFLINE : "";
  if (on) setTimeout(refresh, 2000);
}
async function refresh() {
  try {
    const q = await fetch("/api/queue", {headers: {"X-Token": token, "X-Annotator": annotator}});
    const data = await q.json();
    if (!q.ok) { $("msg").textContent = data.error; return; }
    if (offline) setOffline(false);
    delete img.dataset.want;
    show(data);
  } catch (err) { setOffline(true); }
}
async function call(path, body) {
  if (busy || offline) return;
  busy = true;
  try {
    const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json",
      "X-Token": token, "X-CSRF-Token": csrf, "X-Annotator": annotator},
      body: JSON.stringify(body)});
    const data = await r.json();
    if (r.ok) { $("msg").textContent = ""; show(data); }
    else { $("msg").textContent = data.error; await refresh(); }
  } catch (err) { setOffline(true); }
  finally { busy = false; }
}
function give(label) {
  // only the sample on screen is answered, and only once its image has loaded
  if (busy || offline || shown === null || state.next[0] !== shown) return;
  call("/api/answer", {id: shown, label: label});
}
function undo() {
  const mine = state.mine || [];
  if (mine.length && !state.closed) call("/api/undo", {id: mine[mine.length - 1].id});
}
function press(button, action) {
  button.addEventListener("mousedown", e => e.preventDefault());  // never takes the focus
  button.addEventListener("click", e => { if (e.detail !== 0) action(); });  // no Enter/Space
}
document.querySelectorAll("button.cls").forEach(b =>
  press(b, () => give(Number(b.dataset.label))));
press($("unsure"), () => give("unsure"));
press($("undo"), undo);
function visible() {
  return [...document.querySelectorAll("button.cls")].filter(b => !b.classList.contains("hidden"));
}
if (filter) {
  filter.addEventListener("input", () => {
    const t = filter.value.trim().toLowerCase();
    document.querySelectorAll("button.cls").forEach(b => {
      const i = Number(b.dataset.label);
      b.classList.toggle("hidden", t !== "" && !(state.classes[i].toLowerCase().includes(t)
                                                  || String(i) === t));
    });
  });
}
function clearFilter() {
  if (!filter) return;
  filter.value = ""; filter.dispatchEvent(new Event("input")); filter.blur();
}
document.addEventListener("keydown", e => {
  if (e.repeat || e.ctrlKey || e.metaKey || e.altKey) return;  // held keys answer once
  if (filter && e.target === filter) {
    if (e.key === "Enter") {
      e.preventDefault();
      const v = visible();
      if (v.length === 1) { give(Number(v[0].dataset.label)); clearFilter(); }
    } else if (e.key === "Escape") clearFilter();
    return;
  }
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); return; }  // answer nothing
  const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
  const i = key.length === 1 ? state.keys.indexOf(key) : -1;
  if (i >= 0) give(i);
  else if (key === "u") give("unsure");
  else if (key === "Backspace") { e.preventDefault(); undo(); }
  else if (key === "/" && filter) { e.preventDefault(); filter.focus(); }
});
show(state);
refresh();  // this page's own answers (after a reload too)
</script>
</body></html>
"""
