"""CPU figures for a trained `tiny` run: generation the original's way vs ours, and the query API's latency.

    python bench/cpu_tiny.py --run-dir runs/tiny          # after the chain; prints one JSON table last

1. generation for the run's held-out test descriptions: (a) one prompt at a time, a fixed 256 new tokens, no
   stop (the original's way); (b) ours as notebook 05 runs it (batched, stopped at `</html>` / EOS);
2. the API: the server on a loopback port, `n` sequential real queries (latency) and a bounded concurrent burst
   (requests/s, answered one generation at a time).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import torch


def measure_generation(run_dir: Path) -> dict:
    from htmlgen_utils.generation import generate_pages
    from htmlgen_utils.model import load_trained
    from htmlgen_utils.stages import test_examples

    model, tokenizer, config = load_trained(run_dir)
    descriptions, _ = test_examples(config)
    seed_style = generate_pages(model, tokenizer, descriptions, max_new_tokens=256, batch_size=1,
                                stop_at_html_end=False)
    ours = generate_pages(model, tokenizer, descriptions, config.max_new_tokens, config.generation_batch_size)
    return {"prompts": len(descriptions), "seed_style_one_by_one_256_no_stop": seed_style.summary(),
            "ours_batched_stopped": ours.summary(),
            "examples_per_s_ratio": round(ours.examples_per_s / seed_style.examples_per_s, 2),
            "ours_pages_complete": sum(p.endswith("</html>") for p in ours.pages),
            "seed_style_pages_complete": sum(p.endswith("</html>") for p in seed_style.pages)}


def measure_api(run_dir: Path, sequential: int, burst: int) -> dict:
    import uvicorn

    from htmlgen_utils.serve import load_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(load_app(run_dir, max_waiting=burst + 1), host="127.0.0.1", port=port,
                                           log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/query"

    def ask(i: int) -> float:
        body = json.dumps({"user_prompt": f"A modern pricing page for Acme in blue number {i}"}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            assert "</html>" in json.loads(response.read())["html"]
        return time.perf_counter() - started

    latencies = [ask(i) for i in range(sequential)]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        waited = list(pool.map(ask, range(burst)))
    wall = time.perf_counter() - started
    server.should_exit = True
    return {"sequential_requests": sequential, "latency_s_median": round(statistics.median(latencies), 3),
            "latency_s_max": round(max(latencies), 3), "burst_requests": burst, "burst_concurrency": 8,
            "burst_requests_per_s": round(burst / wall, 3), "burst_latency_s_median": round(statistics.median(waited), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--sequential", type=int, default=10)
    parser.add_argument("--burst", type=int, default=16)
    args = parser.parse_args()
    report = {"torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
              "generation": measure_generation(args.run_dir), "api": measure_api(args.run_dir, args.sequential, args.burst)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
