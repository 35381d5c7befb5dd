"""Ask a running htmlgen server for a page and print it.

    python test.py --api_url http://127.0.0.1:8888/query --user_prompt "a minimalist landing page"
    python test.py --api_url ... --user_prompt ... --out page.html --open
    python test.py --api_url ... --user_prompt ... --stream        # print the page as it is written

Uses only the standard library, so it runs anywhere. Exits non-zero with a clear message when the server
cannot be reached, times out, or answers with an error.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import urllib.error
import urllib.request
import webbrowser
from pathlib import Path


def query(
    api_url: str,
    user_prompt: str,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    timeout: float = 300.0,
) -> dict:
    body = {"user_prompt": user_prompt}
    if max_new_tokens is not None:
        body["max_new_tokens"] = max_new_tokens
    if temperature is not None:
        body["temperature"] = temperature
    request = urllib.request.Request(
        api_url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


def query_stream(
    api_url: str,
    user_prompt: str,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    timeout: float = 300.0,
    show=print,
) -> dict:
    """Ask for a streamed answer (server-sent events); `show` each piece of text as it arrives; return the final
    event's {"html", "tokens", "seconds"}."""
    body = {"user_prompt": user_prompt, "stream": True}
    if max_new_tokens is not None:
        body["max_new_tokens"] = max_new_tokens
    if temperature is not None:
        body["temperature"] = temperature
    request = urllib.request.Request(
        api_url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
    )
    event = "message"
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            line = raw.decode("utf-8").rstrip("\n")
            if line.startswith("event:"):
                event = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data = json.loads(line[len("data:") :])
                if event == "done":
                    return data
                if event == "error":
                    raise ValueError(data.get("error", "the stream ended with an error"))
                show(data["text"])
    raise ValueError("the stream ended without its final event")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api_url", required=True, help="e.g. http://127.0.0.1:8888/query")
    parser.add_argument("--user_prompt", required=True, help="the page to describe")
    parser.add_argument("--max_new_tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answer")
    parser.add_argument("--out", type=Path, default=None, help="also write the page to this file")
    parser.add_argument("--open", action="store_true", help="open the written page in a browser (needs --out)")
    parser.add_argument("--stream", action="store_true", help="print the page as it is written")
    args = parser.parse_args(argv)
    if not args.api_url.startswith(("http://", "https://")):
        print(
            f"error: --api_url {args.api_url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8888/query)",
            file=sys.stderr,
        )
        return 2
    try:
        if args.stream:
            answer = query_stream(
                args.api_url,
                args.user_prompt,
                args.max_new_tokens,
                args.temperature,
                args.timeout,
                show=lambda text: print(text, end="", flush=True),
            )
            print()
        else:
            answer = query(args.api_url, args.user_prompt, args.max_new_tokens, args.temperature, args.timeout)
    except urllib.error.HTTPError as error:
        try:
            detail = json.loads(error.read().decode()).get("error", "")
        except Exception:
            detail = error.reason
        print(f"error: the server answered {error.code}: {detail}", file=sys.stderr)
        return 2
    except urllib.error.URLError as error:
        if isinstance(error.reason, (socket.timeout, TimeoutError)):
            print(
                f"error: no answer from {args.api_url} within {args.timeout:.0f} s (raise --timeout)", file=sys.stderr
            )
        else:
            print(
                f"error: could not connect to {args.api_url} ({error.reason}). Is the server running? Start it with "
                f"`python -m htmlgen_utils.serve --run-dir RUN_DIR`",
                file=sys.stderr,
            )
        return 3
    except (socket.timeout, TimeoutError):
        print(f"error: no answer from {args.api_url} within {args.timeout:.0f} s (raise --timeout)", file=sys.stderr)
        return 3
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.stream:
        print(answer["html"])
    print(f"[{answer.get('tokens')} tokens in {answer.get('seconds')} s]", file=sys.stderr)
    if args.out:
        args.out.write_text(answer["html"], encoding="utf-8")
        print(f"written to {args.out}", file=sys.stderr)
        if args.open:
            webbrowser.open(args.out.resolve().as_uri())
    return 0


if __name__ == "__main__":
    sys.exit(main())
