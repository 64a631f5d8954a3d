"""Load check for `selfcog serve`: concurrent streaming clients against a real server process.

    SELFCOG_HOME=/tmp/selfcog-home python bench/load_serve.py               # the embedded smollm2-135m
    python bench/load_serve.py out/merged --clients 16 --requests 50
    python bench/load_serve.py --tiny                                        # a tiny random model, seconds

Starts `python -m selfcog serve MODEL` on a free loopback port, waits for /health, then runs CLIENTS
concurrent streaming clients until REQUESTS requests are done. Reports failures, throughput (requests/s,
completion tokens/s) and latency percentiles (total and time to first token; both include the time a
request waits in the server's queue, since one model instance answers one request at a time). Writes
JSON to bench/results/load_serve.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Who are you?",
    "你是谁？",
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a neural network is in one sentence.",
    "请介绍一下你自己。",
    "Write a haiku about the sea.",
    "What is two plus two?",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_model(directory: Path) -> Path:
    """The test suite's tiny random chat model (tests/conftest.py), saved into `directory`."""
    from transformers import GenerationConfig

    spec = importlib.util.spec_from_file_location("selfcog_test_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    tokenizer = conftest.build_tokenizer()
    model = conftest.build_tiny_model(len(tokenizer))
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def one_request(client: httpx.AsyncClient, url: str, index: int, max_tokens: int, key: str | None) -> dict:
    body = {"messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}], "stream": True,
            "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    start = time.perf_counter()
    first = None
    tokens = 0
    done = False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return {"ok": False, "error": f"HTTP {response.status_code}: {response.text[:200]}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return {"ok": False, "error": event["error"]["message"]}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if first is None and choice["delta"].get("content"):
                        first = time.perf_counter()
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    end = time.perf_counter()
    if not done:
        return {"ok": False, "error": "stream ended without data: [DONE]"}
    return {"ok": True, "total_s": end - start, "ttft_s": (first or end) - start, "tokens": tokens}


async def run_load(url: str, clients: int, requests: int, max_tokens: int, key: str | None) -> tuple[list, float]:
    counter = iter(range(requests))
    results: list[dict] = []

    async def client_loop(client):
        for index in counter:  # shared iterator: each request is taken by exactly one client
            results.append(await one_request(client, url, index, max_tokens, key))

    timeout = httpx.Timeout(600, connect=10)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    return results, wall


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {timeout:.0f}s")


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["ok"]]
    totals, ttfts = [r["total_s"] for r in ok], [r["ttft_s"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    summary = {
        "requests": len(results), "succeeded": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
        "wall_s": wall, "requests_per_s": len(ok) / wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
    }
    for name, values in (("total", totals), ("ttft", ttfts)):
        for q in (50, 90, 99):
            summary[f"{name}_p{q}_s"] = percentile(values, q)
    return summary


def table(config: dict, s: dict) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    return "\n".join([
        f"Load check: `{config['model']}`, {config['clients']} concurrent streaming clients, "
        f"{config['requests']} requests, max_tokens={config['max_tokens']}, "
        f"{config['cpu_count']} CPU cores, torch threads={config['threads'] or 'default'}, device={config['device']}",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| requests ok / failed | {s['succeeded']} / {s['failed']} |",
        f"| wall time | {s['wall_s']:.1f} s |",
        f"| throughput | {s['requests_per_s']:.2f} req/s, {s['tokens_per_s']:.1f} completion tokens/s |",
        f"| latency total p50 / p90 / p99 | {f(s['total_p50_s'])} / {f(s['total_p90_s'])} / {f(s['total_p99_s'])} s |",
        f"| time to first token p50 / p90 / p99 | {f(s['ttft_p50_s'])} / {f(s['ttft_p90_s'])} / "
        f"{f(s['ttft_p99_s'])} s |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m", help="model spec (default: smollm2-135m)")
    parser.add_argument("--tiny", action="store_true", help="use the test suite's tiny random model instead")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads in the server (OMP_NUM_THREADS); 0 keeps torch's default")
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for the server")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "load_serve.json"))
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.max_tokens < 1:
        parser.error("--clients, --requests and --max-tokens must be >= 1")

    with tempfile.TemporaryDirectory(prefix="selfcog-bench-") as tmp:
        model = str(tiny_model(Path(tmp))) if args.tiny else args.model
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.threads > 0:
            env["OMP_NUM_THREADS"] = str(args.threads)
        log_path = Path(tmp) / "server.log"
        cmd = [sys.executable, "-m", "selfcog", "serve", model, "--port", str(port), "--model-name", "bench"]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    start_new_session=True)
        try:
            print(f"starting: {' '.join(cmd)}", file=sys.stderr)
            try:
                wait_healthy(url, proc, args.ready_timeout)
            except SystemExit:
                print(log_path.read_text()[-3000:], file=sys.stderr)  # why the server did not come up
                raise
            # One warm-up request (not counted): first-call overheads are not what this measures.
            asyncio.run(run_load(url, 1, 1, 4, None))
            load_before = os.getloadavg()[0]
            results, wall = asyncio.run(run_load(url, args.clients, args.requests, args.max_tokens, None))
            load_after = os.getloadavg()[0]
        finally:
            stop_server(proc)

    import torch

    config = {"model": "tiny (random, tests/conftest.py)" if args.tiny else args.model, "clients": args.clients,
              "requests": args.requests, "max_tokens": args.max_tokens, "threads": args.threads or None,
              "cpu_count": os.cpu_count(), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "python": platform.python_version(), "torch": torch.__version__,
              "loadavg_1min_before_after": [round(load_before, 2), round(load_after, 2)],
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    summary = summarize(results, wall)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": config, "summary": summary, "requests": results}, indent=2) + "\n")
    print(table(config, summary))
    print(f"\n(1-min load average before/after: {load_before:.2f} / {load_after:.2f}; JSON: {out})")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
