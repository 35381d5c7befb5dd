"""The query API on the tiny model: test.py as a subprocess, bad requests, and a bounded burst."""

import concurrent.futures
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import uvicorn

from htmlgen_utils.config import REPO_DIR, Config
from htmlgen_utils.model import load_base_model, load_tokenizer
from htmlgen_utils.serve import create_app
from tests.models import adapted_tiny_model
from tests.net import free_port


@pytest.fixture(scope="module")
def server(chain):
    model, tokenizer = adapted_tiny_model(chain[0])  # the chain's fine-tuned model: it answers with pages
    app = create_app(
        model,
        tokenizer,
        max_new_tokens_cap=700,
        default_max_new_tokens=600,
        max_waiting=256,
        description="tiny fine-tuned",
    )
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    for _ in range(100):
        if uv.started:
            break
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=10)


def _post(url, body: bytes, content_type="application/json", timeout=60):
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_client_gets_a_page(server, tmp_path):
    out = tmp_path / "page.html"
    result = subprocess.run(
        [
            sys.executable,
            "test.py",
            "--api_url",
            f"{server}/query",
            "--user_prompt",
            "A minimalist landing page for Acme with a download button",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_DIR,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    page = result.stdout.strip()
    assert page.endswith("</html>") and "### Instruction" not in page  # the page only, prompt stripped
    assert out.read_text() == result.stdout.rstrip("\n")


def test_health_and_form(server):
    with urllib.request.urlopen(f"{server}/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"
    with urllib.request.urlopen(f"{server}/", timeout=10) as response:
        page = response.read().decode()
    assert '<iframe id="preview" sandbox=""' in page


@pytest.mark.parametrize(
    "body,content_type,status",
    [
        (b"not json", "application/json", 400),
        (b'{"user_prompt": "x"}', "text/plain", 415),
        (b"{}", "application/json", 422),
        (b'{"user_prompt": ""}', "application/json", 422),
        (b'{"user_prompt": 5}', "application/json", 422),
        (json.dumps({"user_prompt": "x" * 5000}).encode(), "application/json", 422),
        (json.dumps({"user_prompt": "y" * 20000}).encode(), "application/json", 413),
        (b'{"user_prompt": "a page", "max_new_tokens": 100000}', "application/json", 422),
        (b'{"user_prompt": "a page", "max_new_tokens": "10"}', "application/json", 422),
        (b'{"user_prompt": "a page", "temperature": -1}', "application/json", 422),
        (b'{"user_prompt": "a page", "surprise": 1}', "application/json", 422),
        (b'["user_prompt"]', "application/json", 422),
    ],
)
def test_bad_requests_get_clear_4xx(server, body, content_type, status):
    code, answer = _post(f"{server}/query", body, content_type)
    assert code == status and isinstance(answer["error"], str) and answer["error"]


def test_client_reports_errors_and_refused_connections(server):
    refused = subprocess.run(
        [sys.executable, "test.py", "--api_url", f"http://127.0.0.1:{free_port()}/query", "--user_prompt", "x"],
        capture_output=True,
        text=True,
        cwd=REPO_DIR,
        timeout=60,
    )
    assert refused.returncode == 3 and "could not connect" in refused.stderr
    bad = subprocess.run(
        [sys.executable, "test.py", "--api_url", f"{server}/query", "--user_prompt", "x", "--max_new_tokens", "999999"],
        capture_output=True,
        text=True,
        cwd=REPO_DIR,
        timeout=60,
    )
    assert bad.returncode == 2 and "422" in bad.stderr and "max_new_tokens" in bad.stderr


def test_burst_of_concurrent_and_malformed_requests_leaves_server_healthy(server):
    """1,200 requests over loopback from 16 threads (bounded, stops by itself): mostly malformed, some real."""
    bodies = [
        b"{",
        b'{"user_prompt": ""}',
        b'{"user_prompt": 3}',
        b'{"user_prompt": "x", "max_new_tokens": 0}',
        b"[]",
        b'{"user_prompt": null}',
    ]
    jobs = [(bodies[i % len(bodies)], 422 if bodies[i % len(bodies)] not in (b"{",) else 400) for i in range(1150)]
    jobs += [
        (json.dumps({"user_prompt": f"A login page for Orbit {i}", "max_new_tokens": 8}).encode(), 200)
        for i in range(50)
    ]
    started = time.perf_counter()

    def send(job):
        body, expected = job
        code, answer = _post(f"{server}/query", body)
        return code == expected and (code != 200 or isinstance(answer["html"], str))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, jobs))
    seconds = time.perf_counter() - started
    assert all(results) and len(results) >= 1000
    code, answer = _post(f"{server}/query", json.dumps({"user_prompt": "A retro 404 error page for Nova"}).encode())
    assert code == 200 and "</html>" in answer["html"] and answer["tokens"] > 0
    print(f"burst: {len(jobs)} requests in {seconds:.1f} s ({len(jobs) / seconds:.0f} req/s)")


def test_requests_that_wait_together_are_generated_together(server):
    """40 requests from 8 clients: each gets exactly one answer, its own, and some were batched."""
    prompts = [f"  A   login page\tfor Orbit {i} \n" for i in range(40)]

    def send(prompt):
        return _post(f"{server}/query", json.dumps({"user_prompt": prompt, "max_new_tokens": 8}).encode())

    with urllib.request.urlopen(f"{server}/health", timeout=10) as response:
        before = json.loads(response.read())
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, prompts))
    assert [code for code, _ in answers] == [200] * 40
    assert [a["user_prompt"] for _, a in answers] == [" ".join(p.split()) for p in prompts]  # whitespace normalised
    assert max(a["batch_size"] for _, a in answers) > 1
    with urllib.request.urlopen(f"{server}/health", timeout=10) as response:
        after = json.loads(response.read())
    assert after["served"] - before["served"] == 40 and after["waiting"] == 0


def test_whitespace_only_prompt_is_refused_in_plain_words(server):
    code, answer = _post(f"{server}/query", json.dumps({"user_prompt": " \n\t "}).encode())
    assert code == 422 and answer["error"].startswith("Describe the page you want")
    code, answer = _post(f"{server}/query", b'{"user_prompt": "a page", "max_new_tokens": 0}')
    assert code == 422 and answer["error"] == "max_new_tokens must be a whole number from 1 to 700."


def test_streamed_answer_arrives_in_pieces_and_test_py_prints_it(server):
    sys.path.insert(0, str(REPO_DIR))
    import test as client

    pieces = []
    final = client.query_stream(
        f"{server}/query", "A retro 404 error page for Nova", max_new_tokens=120, show=pieces.append
    )
    from htmlgen_utils.generation import clean_page

    assert len(pieces) > 3 and final["html"] and clean_page("".join(pieces)) == final["html"]
    result = subprocess.run(
        [
            sys.executable,
            "test.py",
            "--api_url",
            f"{server}/query",
            "--user_prompt",
            "A retro 404 error page for Nova",
            "--max_new_tokens",
            "120",
            "--stream",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_DIR,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip().startswith(final["html"][:40])


def test_a_full_queue_answers_503_and_loses_no_request():
    config = Config.from_preset("tiny")
    model = load_base_model(config).eval()
    app = create_app(model, load_tokenizer(config.model_id), max_new_tokens_cap=64, max_waiting=2, max_batch=1)
    from htmlgen_utils.serve import BackgroundServer

    api = BackgroundServer(app, port=free_port())
    try:

        def send(i):
            return _post(f"{api.url}/query", json.dumps({"user_prompt": f"A page {i}", "max_new_tokens": 48}).encode())

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            codes = [code for code, _ in pool.map(send, range(24))]
        assert set(codes) == {200, 503} and len(codes) == 24
        with urllib.request.urlopen(f"{api.url}/health", timeout=10) as response:
            health = json.loads(response.read())
        assert health["served"] == codes.count(200) and health["waiting"] == 0
    finally:
        api.stop()
