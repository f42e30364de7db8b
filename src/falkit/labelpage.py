"""The labeling page (`falkit label`): one client's queue in the browser (issue 17).

A Starlette app: GET / (the page), GET /api/queue (progress and the next sample),
GET /image/<id> (a queued sample's PNG), POST /api/answer and POST /api/undo. Every request
carries the access token (`?token=...`, or the `X-Token` header); missing: 401, wrong: 403.
POSTs also carry the page's CSRF token in `X-CSRF-Token` (403 without it). The queue itself
(validation, locking, atomic writes) is falkit.labeling's.
"""

from __future__ import annotations

import html
import json
import secrets
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from falkit import labeling


def create_app(folder: Path, token: str) -> Starlette:
    """The page for the queue in `folder`, guarded by `token`."""
    folder = Path(folder)
    csrf = secrets.token_urlsafe(24)

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

    def state() -> dict[str, Any]:
        return labeling.progress(labeling.read_queue(folder), labeling.read_answers(folder))

    async def page(request: Request) -> Response:
        return guard(request) or HTMLResponse(_page(state(), csrf))

    async def queue(request: Request) -> Response:
        return guard(request) or JSONResponse(state())

    async def image(request: Request) -> Response:
        denied = guard(request)
        if denied:
            return denied
        try:
            sid = labeling.sample_id(labeling.read_queue(folder), request.path_params["sample"])
        except labeling.QueueError as e:
            return JSONResponse({"error": str(e)}, e.status)
        return Response((folder / f"img_{sid}.png").read_bytes(), media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    async def post(request: Request, action) -> Response:
        denied = guard(request, post=True)
        if denied:
            return denied
        try:
            body = await request.json() if await request.body() else {}
            if not isinstance(body, dict):
                raise labeling.QueueError("the body must be a JSON object")
            return JSONResponse(action(body))
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, 400)
        except labeling.QueueError as e:
            return JSONResponse({"error": str(e)}, e.status)

    async def answer(request: Request) -> Response:
        return await post(request, lambda b: labeling.answer(folder, b.get("id"),
                                                             b.get("label")))

    async def undo(request: Request) -> Response:
        return await post(request, lambda b: labeling.undo(folder, b.get("id")))

    return Starlette(routes=[
        Route("/", page), Route("/api/queue", queue),
        Route("/image/{sample}", image),
        Route("/api/answer", answer, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
    ])


def serve(folder: Path, host: str = "127.0.0.1", port: int = 8765,
          token: str | None = None) -> None:
    """Serve the page until Ctrl-C; the URL (with the token) is printed once the port
    listens."""
    import socket

    import uvicorn

    from falkit.errors import FalkitError

    token = token or labeling.new_token()
    app = create_app(folder, token)
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
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"labeling client {q['client']}, cycle {q['cycle'] + 1}: "
          f"{len(labeling.read_answers(folder))} / {len(q['ids'])} answered")
    print(f"open http://{shown}:{port}/?token={token}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])


def _page(state: dict[str, Any], csrf: str) -> str:
    classes = state["classes"]
    keys = [str(i) for i in range(min(10, len(classes)))]
    buttons = "".join(
        f'<button class="cls" data-label="{i}">'
        f'{"<kbd>" + keys[i] + "</kbd> " if i < len(keys) else ""}{html.escape(c)}</button>'
        for i, c in enumerate(classes))
    return _HTML.replace("__CSRF__", csrf).replace("__BUTTONS__", buttons).replace(
        "__STATE__", json.dumps(state).replace("<", "\\u003c")).replace(
        "__TITLE__", f"falkit — label client {state['client']}, cycle {state['cycle'] + 1}")


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf" content="__CSRF__">
<title>__TITLE__</title>
<style>
 body { font-family: system-ui, sans-serif; max-width: 860px; margin: 2em auto; color: #222; }
 header { display: flex; justify-content: space-between; align-items: baseline; }
 #progress { font-size: 1.4em; font-variant-numeric: tabular-nums; }
 #bar { height: 6px; background: #eee; border-radius: 3px; margin: .5em 0 1.5em; }
 #bar div { height: 6px; background: #2a7; border-radius: 3px; width: 0; }
 #sample { text-align: center; }
 #sample img { image-rendering: pixelated; width: 320px; height: 320px; border: 1px solid #ccc; }
 #buttons { display: flex; flex-wrap: wrap; gap: .5em; justify-content: center; margin: 1em 0; }
 button { font-size: 1.05em; padding: .5em .9em; border: 1px solid #999; border-radius: 6px;
          background: #fafafa; cursor: pointer; }
 button:hover { background: #e8f4ee; }
 kbd { font-family: monospace; background: #eee; border: 1px solid #bbb; border-radius: 3px;
       padding: 0 .3em; }
 #done { display: none; text-align: center; font-size: 1.3em; margin-top: 3em; }
 #msg { color: #b00; min-height: 1.2em; text-align: center; }
 .hint { color: #666; text-align: center; font-size: .9em; }
</style></head>
<body>
<header><h2>__TITLE__</h2><div id="progress"></div></header>
<div id="bar"><div></div></div>
<script id="state" type="application/json">__STATE__</script>
<div id="work">
 <div id="sample"><img id="img" alt="sample to label" data-sample=""></div>
 <div id="buttons">__BUTTONS__</div>
 <div id="buttons2" style="text-align:center">
  <button id="unsure"><kbd>u</kbd> unsure</button>
  <button id="undo"><kbd>Backspace</kbd> undo</button>
 </div>
 <p class="hint">Number keys choose a class; <kbd>u</kbd>: unsure (the sample goes back to
 the pool, it still counts against the budget); <kbd>Backspace</kbd>: undo the last answer.</p>
</div>
<div id="msg"></div>
<div id="done">All samples of this queue are labeled. Run the same falkit command again
to continue the run.</div>
<script>
const token = new URLSearchParams(location.search).get("token");
const csrf = document.querySelector('meta[name="csrf"]').content;
let state = JSON.parse(document.getElementById("state").textContent);
let busy = false;
const mine = [];  // this page's answers, newest last: undo takes back only these
function show(s) {
  state = s;
  document.getElementById("progress").textContent = s.answered + " / " + s.total;
  document.querySelector("#bar div").style.width = (100 * s.answered / s.total) + "%";
  const img = document.getElementById("img");
  if (s.next.length === 0) {
    document.getElementById("work").style.display = "none";
    document.getElementById("done").style.display = "block";
    img.dataset.sample = "";
    return;
  }
  document.getElementById("work").style.display = "block";
  document.getElementById("done").style.display = "none";
  const id = s.next[0];
  if (img.dataset.sample !== String(id)) {
    img.dataset.sample = "";
    img.onload = () => { img.dataset.sample = String(id); };
    img.src = "/image/" + id + "?token=" + encodeURIComponent(token);
  }
}
async function call(path, body) {
  if (busy) return;
  busy = true;
  try {
    const r = await fetch(path + "?token=" + encodeURIComponent(token), {method: "POST",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: JSON.stringify(body || {})});
    const data = await r.json();
    if (r.ok) {
      document.getElementById("msg").textContent = "";
      if (path === "/api/answer") mine.push(body.id);
      else if (path === "/api/undo") mine.pop();
      show(data);
    }
    else {
      document.getElementById("msg").textContent = data.error;
      const q = await fetch("/api/queue?token=" + encodeURIComponent(token));
      if (q.ok) show(await q.json());
    }
  } finally { busy = false; }
}
function give(label) {
  if (state.next.length) call("/api/answer", {id: state.next[0], label: label});
}
document.querySelectorAll("button.cls").forEach(b =>
  b.addEventListener("click", () => give(Number(b.dataset.label))));
document.getElementById("unsure").addEventListener("click", () => give("unsure"));
function undo() {
  if (mine.length) call("/api/undo", {id: mine[mine.length - 1]});
}
document.getElementById("undo").addEventListener("click", undo);
document.addEventListener("keydown", e => {
  if (/^[0-9]$/.test(e.key) && Number(e.key) < state.classes.length) give(Number(e.key));
  else if (e.key === "u") give("unsure");
  else if (e.key === "Backspace") { e.preventDefault(); undo(); }
});
show(state);
</script>
</body></html>
"""
