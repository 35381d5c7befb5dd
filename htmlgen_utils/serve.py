"""The trained model behind a small HTTP API.

    python -m htmlgen_utils.serve --run-dir runs/tiny [--host 127.0.0.1] [--port 8888] [--max-batch 8]

* `POST /query` with JSON `{"user_prompt": "...", "max_new_tokens": 512, "temperature": 0.0, "stream": false}` (all
  but the prompt optional) answers `{"html": "...", "tokens": N, "seconds": S, "batch_size": B, "user_prompt": ...}`;
  with `"stream": true` it answers server-sent events: `data: {"text": ...}` as the page is written, then
  `event: done` with the whole page.
* `GET /health` says the server is up and what it serves; `GET /` is a form that renders the answer in a
  sandboxed frame.

FastAPI (with uvicorn) does the HTTP: it validates JSON bodies against a typed schema and turns mistakes into
4xx answers in plain words, so no request can take the server down. One worker thread owns the model: requests
that wait together (up to `max_batch`, collected for `batch_wait_ms`) are generated as one batch, which costs
little more than one page; when more than `max_waiting` are already waiting the server answers 503 at once
instead of queueing without bound. Binds 127.0.0.1 unless told otherwise; no endpoint reads or writes files.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

MAX_PROMPT_CHARS = 2000
MAX_BODY_BYTES = 16_384


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_prompt: StrictStr = Field(max_length=MAX_PROMPT_CHARS)
    max_new_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | StrictInt | None = Field(default=None, ge=0, le=2)
    stream: StrictBool = False

    @field_validator("user_prompt")
    @classmethod
    def one_line_of_single_spaces(cls, value: str) -> str:
        """Whitespace normalised as the training descriptions were (`data.validate_and_clean`)."""
        value = " ".join(value.split())
        if not value:
            raise ValueError("empty")
        return value


# What each field's mistake means, in words a person reads in the form
FIELD_HELP = {
    "user_prompt": f"Describe the page you want: user_prompt must be text of 1 to {MAX_PROMPT_CHARS} characters "
    f"(not only spaces).",
    "max_new_tokens": "max_new_tokens must be a whole number from 1 to {cap}.",
    "temperature": "temperature must be a number from 0 (greedy) to 2.",
    "stream": "stream must be true or false.",
}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


class Busy(Exception):
    pass


@dataclass
class _Job:
    prompt: str
    max_new_tokens: int
    temperature: float
    stream: bool = False
    future: Future = field(default_factory=Future)
    pieces: queue.Queue = field(default_factory=queue.Queue)  # a stream's text, then a final dict (or exception)


class GenerationQueue:
    """One worker thread owns the model; requests that arrive together are generated together.

    The worker takes the first waiting request, then gathers what else arrives within `batch_wait_ms`, up to
    `max_batch`, and generates each group of equal settings as one batch. A streamed request runs on its own
    (its pieces go out as they are written)."""

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 8,
        batch_wait_ms: float = 10.0,
        max_waiting: int = 32,
        compile_decode: bool = False,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait, self.max_waiting = max_batch, batch_wait_ms / 1000, max_waiting
        self.compile_decode = compile_decode
        self.jobs: queue.Queue = queue.Queue()
        self.waiting = 0
        self.counts = {"served": 0, "errors": 0, "batches": 0, "largest_batch": 0}
        self._lock = threading.Lock()
        self._backlog: list[_Job] = []
        self._worker = threading.Thread(target=self._run, daemon=True, name="htmlgen-generation")
        self._worker.start()

    def submit(self, job: _Job) -> _Job:
        with self._lock:
            if self.waiting >= self.max_waiting:
                raise Busy()
            self.waiting += 1
        self.jobs.put(job)
        return job

    def close(self) -> None:
        self.jobs.put(None)
        self._worker.join(timeout=60)

    def _done(self, jobs: list[_Job]) -> None:
        with self._lock:
            self.waiting -= len(jobs)

    def _next(self, timeout: float | None) -> _Job | None:
        if self._backlog:
            return self._backlog.pop(0)
        return self.jobs.get(timeout=timeout) if timeout is None or timeout > 0 else self.jobs.get_nowait()

    def _run(self) -> None:
        while True:
            job = self._next(None)
            if job is None:
                return
            if job.stream:
                self._stream(job)
                continue
            batch, deadline = [job], time.monotonic() + self.batch_wait
            while len(batch) < self.max_batch:
                try:
                    more = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
                if more is None or more.stream:  # a stream (or the stop) waits for this batch
                    self._backlog.append(more)
                    break
                batch.append(more)
            groups: dict[tuple, list[_Job]] = {}
            for item in batch:
                groups.setdefault((item.max_new_tokens, item.temperature), []).append(item)
            for (max_new_tokens, temperature), group in groups.items():
                self._generate(group, max_new_tokens, temperature)
            if None in self._backlog:
                return

    def _generate(self, group: list[_Job], max_new_tokens: int, temperature: float) -> None:
        from .generation import generate_pages

        try:
            # compiled decoding keeps to two batch sizes (1 and max_batch), so each compiles once
            size = 1 if len(group) == 1 else (self.max_batch if self.compile_decode else len(group))
            result = generate_pages(
                self.model,
                self.tokenizer,
                [job.prompt for job in group],
                max_new_tokens,
                batch_size=size,
                do_sample=temperature > 0,
                temperature=temperature or 1.0,
                compile_decode=self.compile_decode,
            )
        except Exception as error:  # every request of the batch gets the error; the server goes on
            self.counts["errors"] += len(group)
            self._done(group)
            for job in group:
                job.future.set_exception(error)
            return
        self.counts["served"] += len(group)
        self.counts["batches"] += 1
        self.counts["largest_batch"] = max(self.counts["largest_batch"], len(group))
        self._done(group)
        for job, page, tokens in zip(group, result.pages, result.new_tokens):
            job.future.set_result(
                {
                    "html": page,
                    "tokens": tokens,
                    "seconds": round(result.seconds, 3),
                    "batch_size": len(group),
                    "user_prompt": job.prompt,
                }
            )

    def _stream(self, job: _Job) -> None:
        from .generation import clean_page, stream_page

        started, text = time.perf_counter(), ""
        try:
            for piece in stream_page(
                self.model,
                self.tokenizer,
                job.prompt,
                job.max_new_tokens,
                do_sample=job.temperature > 0,
                temperature=job.temperature or 1.0,
                compile_decode=self.compile_decode,
            ):
                text += piece
                job.pieces.put(piece)
            page = clean_page(text)
            self.counts["served"] += 1
            job.pieces.put(
                {
                    "html": page,
                    "tokens": len(self.tokenizer(page, add_special_tokens=False).input_ids),
                    "seconds": round(time.perf_counter() - started, 3),
                    "user_prompt": job.prompt,
                }
            )
        except Exception as error:
            self.counts["errors"] += 1
            job.pieces.put(error)
        finally:
            self._done([job])


def _server_sent_events(job: _Job):
    """The stream's pieces as server-sent events: `data: {"text": ...}`, then `event: done` (or `event: error`)."""
    while True:
        item = job.pieces.get()
        if isinstance(item, str):
            yield f"data: {json.dumps({'text': item})}\n\n"
        elif isinstance(item, dict):
            yield f"event: done\ndata: {json.dumps(item)}\n\n"
            return
        else:
            yield f"event: error\ndata: {json.dumps({'error': f'generation failed: {item}'})}\n\n"
            return


def create_app(
    model,
    tokenizer,
    max_new_tokens_cap: int = 1024,
    default_max_new_tokens: int | None = None,
    max_waiting: int = 32,
    description: str = "",
    compile_decode: bool = False,
    max_batch: int = 8,
    batch_wait_ms: float = 10.0,
) -> FastAPI:
    """The API around an already loaded model (tests build it around the tiny model). `max_batch=1` serves one
    request at a time."""
    default_tokens = min(default_max_new_tokens or max_new_tokens_cap, max_new_tokens_cap)
    if compile_decode:  # before serving: the first request should not wait for the compiler
        from .generation import warm_up_decoding

        warm_up_decoding(model, tokenizer, default_tokens)
    generation = GenerationQueue(model, tokenizer, max_batch, batch_wait_ms, max_waiting, compile_decode)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        generation.close()

    app = FastAPI(title="htmlgen", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.generation = generation

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _error(413, f"The request is over {MAX_BODY_BYTES:,} bytes: shorten the description.")
        if request.method == "POST" and "application/json" not in request.headers.get("content-type", ""):
            return _error(415, "Send JSON with the header Content-Type: application/json.")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError):
        problems = []
        for item in error.errors():
            if item.get("type") == "json_invalid":
                return _error(400, 'The body is not valid JSON: send {"user_prompt": "a page about ..."}.')
            where = [str(p) for p in item.get("loc", ()) if p != "body"]
            name = where[0] if where else ""
            if item.get("type") == "extra_forbidden":
                problems.append(
                    f"Unknown field {name!r}: send user_prompt, and optionally max_new_tokens, temperature, stream."
                )
            elif name in FIELD_HELP:
                problems.append(FIELD_HELP[name].format(cap=max_new_tokens_cap))
            else:
                problems.append('Send a JSON object like {"user_prompt": "a page about ..."}.')
        return _error(422, " ".join(dict.fromkeys(problems)))

    @app.get("/health")
    def health():
        return {
            "status": "ok",
            "model": description,
            "waiting": generation.waiting,
            "max_new_tokens_cap": max_new_tokens_cap,
            "max_batch": generation.max_batch,
            **generation.counts,
        }

    @app.post("/query")
    def query(body: Query):
        tokens = body.max_new_tokens or default_tokens
        if tokens > max_new_tokens_cap:
            return _error(422, FIELD_HELP["max_new_tokens"].format(cap=max_new_tokens_cap))
        try:
            job = generation.submit(_Job(body.user_prompt, tokens, float(body.temperature or 0.0), body.stream))
        except Busy:
            return _error(503, "The server is busy: too many requests are waiting. Try again shortly.")
        if body.stream:
            return StreamingResponse(
                _server_sent_events(job), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            return job.future.result()
        except Exception as error:  # never let one request take the server down
            return _error(500, f"Generation failed: {type(error).__name__}: {error}")

    @app.get("/", response_class=HTMLResponse)
    def form():
        # data: images in generated pages show in the preview; nothing is fetched from elsewhere
        return HTMLResponse(
            FORM_PAGE,
            headers={
                "Content-Security-Policy": (
                    "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; "
                    "font-src data:; frame-src 'self'"
                )
            },
        )

    @app.get("/favicon.ico")
    def favicon():
        return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    return app


FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
    b'fill="#2563eb"/><path d="M5 4 2 8l3 4M11 4l3 4-3 4" stroke="#fff" stroke-width="1.6" fill="none"/></svg>'
)

FORM_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>htmlgen</title><link rel="icon" href="/favicon.ico" type="image/svg+xml">
<style>body{font-family:system-ui,sans-serif;margin:16px auto;max-width:1000px;padding:0 12px}
textarea{width:100%;box-sizing:border-box;height:70px;font:inherit}label{font-weight:600}
button{font:inherit;padding:6px 16px}button:disabled{opacity:.5}
iframe{width:100%;height:520px;border:1px solid #ccc;margin-top:8px;background:#fff}
#status{color:#555;margin-left:8px}#status.error{color:#b91c1c;font-weight:600}</style></head>
<body><h1>htmlgen</h1><p>Describe a page; the model writes it. The page is shown in a sandboxed frame: its scripts
do not run, and its links stay inside the frame.</p>
<form id="form"><label for="prompt">Page description</label>
<textarea id="prompt" name="prompt" required>A minimalist landing page with a download button</textarea>
<button id="go" type="submit">Generate</button> <span id="status" role="status" aria-live="polite"></span>
<small>Enter generates; Shift+Enter starts a new line.</small></form>
<iframe id="preview" sandbox="" title="generated page"></iframe>
<details><summary>source</summary><pre id="source" style="white-space:pre-wrap"></pre></details>
<script>
const form = document.getElementById('form'), prompt = document.getElementById('prompt'),
      go = document.getElementById('go'), status = document.getElementById('status'),
      preview = document.getElementById('preview'), source = document.getElementById('source');
// Links in a srcdoc frame resolve against this page's address, so "#pricing" would load this app in the frame.
// As htmlgen_utils.rendering.preview_document: <base href="about:srcdoc"> keeps "#section" links scrolling inside
// the preview; any other link gets target="_blank", which the sandbox (no popups) turns into nothing.
function previewDocument(page) {
  const base = '<base href="about:srcdoc">';
  const head = /<head\\b[^>]*>/i.exec(page), doctype = /<!doctype[^>]*>/i.exec(page);
  const at = head ? head.index + head[0].length : doctype ? doctype.index + doctype[0].length : 0;
  page = page.slice(0, at) + base + page.slice(at);
  return page.replace(/<(a|area)(?=\\s)(?=[^>]*?\\shref\\s*=\\s*(?!["']?#))/gi, '<$1 target="_blank"');
}
function say(text, isError) { status.textContent = text; status.className = isError ? 'error' : ''; }
form.addEventListener('submit', async (event) => {
  event.preventDefault();
  if (go.disabled) return;
  if (!prompt.value.trim()) { say('Describe the page you want first.', true); return; }
  go.disabled = true; say('Generating…', false);
  try {
    const response = await fetch('/query', {method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({user_prompt: prompt.value})});
    const answer = await response.json();
    if (!response.ok) {
      preview.srcdoc = ''; source.textContent = '';
      say('Could not generate: ' + answer.error, true); return;
    }
    preview.srcdoc = previewDocument(answer.html);
    source.textContent = answer.html;
    say(answer.tokens + ' tokens in ' + answer.seconds + ' s', false);
  } catch (e) {
    preview.srcdoc = ''; say('Could not reach the server: ' + e.message, true);
  } finally { go.disabled = false; }
});
prompt.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
});
</script></body></html>
"""


def load_app(run_dir: str | Path, max_waiting: int = 32, max_batch: int = 8) -> FastAPI:
    from .levers import wants_compiled_decode
    from .model import load_trained
    from .stages import generation_length

    model, tokenizer, config = load_trained(run_dir)
    config = config.replace(run_dir=str(run_dir))
    tokens = generation_length(config, tokenizer)
    return create_app(
        model,
        tokenizer,
        max_new_tokens_cap=max(tokens, 32),
        compile_decode=wants_compiled_decode(model, config),
        max_batch=max_batch,
        default_max_new_tokens=tokens,
        max_waiting=max_waiting,
        description=f"{config.model_id} + adapter from {Path(run_dir).name}",
    )


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
    parser.add_argument("--max-batch", type=int, default=8, help="requests generated together (1: one at a time)")
    args = parser.parse_args(argv)
    if Path(args.run_dir).is_file():
        raise ValueError(f"--run-dir {args.run_dir} is a file: give the run's folder (the one holding adapter/)")
    started = time.perf_counter()
    app = load_app(args.run_dir, args.max_waiting, args.max_batch)
    print(
        f"model loaded in {time.perf_counter() - started:.1f} s; serving on http://{args.host}:{args.port}/", flush=True
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    from .cli import run_cli

    run_cli(main)
