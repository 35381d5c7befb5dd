"""The trained model behind a small HTTP API.

    python -m htmlgen_utils.serve --run-dir runs/tiny [--host 127.0.0.1] [--port 8888]

* `POST /query` with JSON `{"user_prompt": "...", "max_new_tokens": 512, "temperature": 0.0}` (the last two
  optional) answers `{"html": "...", "tokens": N, "seconds": S}`.
* `GET /health` says the server is up and what it serves; `GET /` is a form that renders the answer in a
  sandboxed iframe.

FastAPI (with uvicorn) does the HTTP: it is well kept, validates JSON bodies against a typed schema, and
turns mistakes into 4xx JSON answers, so no request can take the server down. One model serves every
request: requests wait their turn on a lock (handlers run in FastAPI's thread pool), and when more than
`max_waiting` are already waiting the server answers 503 at once instead of queueing without bound.
Binds 127.0.0.1 unless told otherwise; no endpoint reads or writes files.
"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

MAX_PROMPT_CHARS = 2000
MAX_BODY_BYTES = 16_384


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_prompt: StrictStr = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | StrictInt | None = Field(default=None, ge=0, le=2)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def create_app(model, tokenizer, max_new_tokens_cap: int = 1024, default_max_new_tokens: int | None = None,
               max_waiting: int = 32, description: str = "", compile_decode: bool = False) -> FastAPI:
    """The API around an already loaded model (tests build it around the tiny model). `compile_decode`: each
    request is decoded by `generation.decode_one` around the static-cache, compiled decode step."""
    from .generation import generate_pages

    app = FastAPI(title="htmlgen", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()
    counters = {"waiting": 0, "served": 0, "errors": 0}
    counters_lock = threading.Lock()
    default_tokens = min(default_max_new_tokens or max_new_tokens_cap, max_new_tokens_cap)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes")
        if request.method == "POST" and "application/json" not in request.headers.get("content-type", ""):
            return _error(415, "send JSON with Content-Type: application/json")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError):
        problems = []
        for item in error.errors():
            if item.get("type") == "json_invalid":
                return _error(400, "the body is not valid JSON")
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {item.get('msg')}")
        return _error(422, "; ".join(problems))

    @app.get("/health")
    def health():
        return {"status": "ok", "model": description, "served": counters["served"], "waiting": counters["waiting"],
                "max_new_tokens_cap": max_new_tokens_cap}

    @app.post("/query")
    def query(body: Query):
        tokens = body.max_new_tokens or default_tokens
        if tokens > max_new_tokens_cap:
            return _error(422, f"max_new_tokens: at most {max_new_tokens_cap}")
        with counters_lock:
            if counters["waiting"] >= max_waiting:
                return _error(503, "busy: too many requests waiting, try again shortly")
            counters["waiting"] += 1
        try:
            with lock:  # one generation at a time on the one model
                temperature = float(body.temperature or 0.0)
                result = generate_pages(model, tokenizer, [body.user_prompt], max_new_tokens=tokens, batch_size=1,
                                        do_sample=temperature > 0, temperature=temperature or 1.0,
                                        compile_decode=compile_decode)
        except Exception as error:  # never let one request take the server down
            counters["errors"] += 1
            return _error(500, f"generation failed: {type(error).__name__}: {error}")
        finally:
            with counters_lock:
                counters["waiting"] -= 1
        counters["served"] += 1
        return {"html": result.pages[0], "tokens": result.new_tokens[0], "seconds": round(result.seconds, 3)}

    @app.get("/", response_class=HTMLResponse)
    def form():
        return HTMLResponse(FORM_PAGE, headers={"Content-Security-Policy": "default-src 'self'; "
                                                "script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-src 'self'"})

    return app


FORM_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>htmlgen</title>
<style>body{font-family:system-ui,sans-serif;margin:24px;max-width:1000px}textarea{width:100%;height:70px}
iframe{width:100%;height:520px;border:1px solid #ccc}#status{color:#555}</style></head>
<body><h1>htmlgen</h1><p>Describe a page; the model writes it. The page is shown in a sandboxed frame.</p>
<textarea id="prompt">A minimalist landing page with a download button</textarea><br>
<button id="go">Generate</button> <span id="status"></span>
<iframe id="preview" sandbox="" title="generated page"></iframe>
<details><summary>source</summary><pre id="source" style="white-space:pre-wrap"></pre></details>
<script>
document.getElementById('go').onclick = async () => {
  const status = document.getElementById('status');
  status.textContent = 'generating…';
  try {
    const response = await fetch('/query', {method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({user_prompt: document.getElementById('prompt').value})});
    const answer = await response.json();
    if (!response.ok) { status.textContent = 'error: ' + answer.error; return; }
    document.getElementById('preview').srcdoc = answer.html;
    document.getElementById('source').textContent = answer.html;
    status.textContent = answer.tokens + ' tokens in ' + answer.seconds + ' s';
  } catch (e) { status.textContent = 'error: ' + e; }
};
</script></body></html>
"""


def load_app(run_dir: str | Path, max_waiting: int = 32) -> FastAPI:
    from .levers import wants_compiled_decode
    from .model import load_trained

    model, tokenizer, config = load_trained(run_dir)
    return create_app(model, tokenizer, max_new_tokens_cap=max(config.max_new_tokens, 32),
                      compile_decode=wants_compiled_decode(model, config),
                      default_max_new_tokens=config.max_new_tokens, max_waiting=max_waiting,
                      description=f"{config.model_id} + adapter from {Path(run_dir).name}")


class BackgroundServer:
    """The API served from a thread of this process (notebook 05: the model is already loaded there), until
    `stop()`. Binds 127.0.0.1; on Colab, `colab.show_server_link` makes it reachable from the browser."""

    def __init__(self, app: FastAPI, port: int, host: str = "127.0.0.1", timeout: float = 30.0):
        import uvicorn

        self.port, self.host = port, host
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"htmlgen-api-{port}")
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start on {host}:{port} (is the port taken? choose another)")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve a trained run over HTTP.")
    parser.add_argument("--run-dir", required=True, help="a run directory with adapter/ (notebook 04's output)")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--max-waiting", type=int, default=32, help="requests allowed to wait before 503")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    app = load_app(args.run_dir, args.max_waiting)
    print(f"model loaded in {time.perf_counter() - started:.1f} s; serving on http://{args.host}:{args.port}/",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    from .cli import run_cli

    run_cli(main)
