"""The query API under load, on loopback: batched serving against one request at a time, and malformed traffic.

    python bench/serve_load.py --run-dir runs/tiny --out bench/results     # CPU, a trained tiny run; ~6 minutes

One model is loaded once; each system is the same app with a different `max_batch` (16 = requests that wait
together are generated together; 1 = one at a time), started on a loopback port in this process. Each repeat sends
`--requests` real queries from `--clients` concurrent clients (each client sends its next request when the
previous is answered) and records every answer's status and latency. Systems are interleaved (A B A B ...) for
`--repeats` rounds; the report gives medians and min-max. Then one batched round mixes in malformed requests (a
quarter of the traffic) and counts the 2xx/4xx/5xx answers. Prints one JSON table last and writes it to --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import statistics
import time
import urllib.error
import urllib.request
from pathlib import Path

from common import write_report

MALFORMED = [
    (b"{", 400),
    (b'{"user_prompt": "   "}', 422),
    (b'{"user_prompt": 3}', 422),
    (b'{"user_prompt": "a page", "max_new_tokens": 0}', 422),
    (b"[]", 422),
    (b'{"user_prompt": "a page", "surprise": true}', 422),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes, timeout: float = 600) -> tuple[int, float]:
    started = time.perf_counter()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        error.read()
        status = error.code
    return status, time.perf_counter() - started


def load(url: str, bodies: list[bytes], clients: int) -> dict:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda body: _post(url, body), bodies))
    seconds = time.perf_counter() - started
    latencies = sorted(latency for status, latency in results if status == 200)
    statuses = [status for status, _ in results]
    return {
        "requests": len(bodies),
        "answered": len(results),
        "seconds": round(seconds, 2),
        "ok": statuses.count(200),
        "4xx": sum(400 <= s < 500 for s in statuses),
        "5xx": sum(s >= 500 for s in statuses),
        "pages_per_s": round(statuses.count(200) / seconds, 3),
        "p50_s": round(latencies[len(latencies) // 2], 3) if latencies else None,
        "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3) if latencies else None,
    }


def summarise(rounds: list[dict]) -> dict:
    out = {}
    for key in ("pages_per_s", "p50_s", "p95_s"):
        values = [r[key] for r in rounds]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["all_answered"] = all(r["answered"] == r["requests"] == r["ok"] for r in rounds)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a trained run (notebook 04's output), e.g. runs/tiny")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=96, help="per page (bounds the run's time)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--out", default=None, help="folder for serve_load.json")
    args = parser.parse_args(argv)

    from htmlgen_utils.data import load_saved_splits
    from htmlgen_utils.model import load_trained
    from htmlgen_utils.serve import BackgroundServer, create_app

    model, tokenizer, config = load_trained(args.run_dir)
    descriptions = [d for split in load_saved_splits(args.run_dir).values() for d in split["label"]]
    bodies = [
        json.dumps({"user_prompt": descriptions[i % len(descriptions)], "max_new_tokens": args.max_new_tokens}).encode()
        for i in range(args.requests)
    ]
    systems = {"batched": args.max_batch, "one at a time": 1}
    rounds: dict[str, list[dict]] = {name: [] for name in systems}
    for repeat in range(args.repeats):
        for name, max_batch in systems.items():  # interleaved: A B A B ...
            app = create_app(
                model,
                tokenizer,
                max_new_tokens_cap=max(args.max_new_tokens, 32),
                max_waiting=args.clients + 1,
                max_batch=max_batch,
            )
            server = BackgroundServer(app, port=_free_port())
            try:
                result = load(f"{server.url}/query", bodies, args.clients)
                result["largest_batch"] = app.state.generation.counts["largest_batch"]
            finally:
                server.stop()
            rounds[name].append(result)
            print(f"round {repeat + 1} {name}: {result}", flush=True)
    mixed_bodies = [MALFORMED[i % len(MALFORMED)][0] if i % 4 == 3 else body for i, body in enumerate(bodies)]
    expected = [MALFORMED[i % len(MALFORMED)][1] if i % 4 == 3 else 200 for i in range(len(bodies))]
    app = create_app(
        model,
        tokenizer,
        max_new_tokens_cap=max(args.max_new_tokens, 32),
        max_waiting=args.clients + 1,
        max_batch=args.max_batch,
    )
    server = BackgroundServer(app, port=_free_port())
    try:
        url = f"{server.url}/query"
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            statuses = [status for status, _ in pool.map(lambda body: _post(url, body), mixed_bodies)]
    finally:
        server.stop()
    mixed = {
        "requests": len(statuses),
        "malformed": expected.count(400) + expected.count(422),
        "2xx": sum(s < 300 for s in statuses),
        "4xx": sum(400 <= s < 500 for s in statuses),
        "5xx": sum(s >= 500 for s in statuses),
        "each_as_expected": statuses == expected,
    }
    summary = {name: summarise(results) for name, results in rounds.items()}
    report = {
        "setup": {
            "run_dir": str(args.run_dir),
            "model": config.model_id,
            "requests": args.requests,
            "clients": args.clients,
            "repeats": args.repeats,
            "max_new_tokens": args.max_new_tokens,
            "max_batch": args.max_batch,
            "device": str(next(model.parameters()).device),
        },
        "rounds": rounds,
        "summary": summary,
        "batched_over_one_at_a_time_pages_per_s": round(
            summary["batched"]["pages_per_s"]["median"] / summary["one at a time"]["pages_per_s"]["median"], 2
        ),
        "mixed_traffic_batched": mixed,
    }
    write_report(report, Path(args.out or "/tmp"), "serve_load.json")
    return report


if __name__ == "__main__":
    main()
