"""Side-by-side load bench of OpenAI-compatible servers on one merged model, over loopback.

    python bench/serve.py                                  # the embedded smollm2-135m, 1/4/16 clients
    python bench/serve.py out/merged --rounds 2 --endurance 50
    python bench/serve.py --tiny --loads 1 4               # a tiny random model, seconds

Servers: `selfcog serve` (continuous batching), `selfcog serve --no-batching` (one request at a time) and
`transformers serve --continuous-batching --device cpu`, all started once, with the same torch thread count
and dtype; llama.cpp's server joins when `llama_cpp` is importable and `--gguf FILE` is given. Each round
runs every load against every server in turn (interleaved, so a busy machine slows all of them alike).
Completion tokens are counted by re-tokenizing each answer with the model's tokenizer, the same for every server.
`--endurance N` then sends CLIENTS x N requests to the batched selfcog server and counts failures.
Writes bench/results/serve.json, serve.md and serve.png.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from load_serve import PROMPTS, free_port, percentile, stop_server, tiny_model, wait_healthy  # noqa: E402
from machine import cpu_features, cpu_name  # noqa: E402

LABELS = {"selfcog": "selfcog serve (batched)", "selfcog-one": "selfcog serve --no-batching",
          "transformers": "transformers serve --continuous-batching", "llama.cpp": "llama.cpp server (q8_0)"}


def server_commands(model: str, dtype: str, gguf: str | None, max_batch: int) -> dict[str, list[str]]:
    py = sys.executable
    cmds = {
        "selfcog": [py, "-m", "selfcog", "serve", model, "--dtype", dtype, "--max-batch", str(max_batch)],
        "selfcog-one": [py, "-m", "selfcog", "serve", model, "--dtype", dtype, "--no-batching"],
        # Its paged KV cache is sized to the load (4096 tokens): left to size itself, it took 12.8 GB and was
        # killed for memory on a 23 GB machine.
        "transformers": [str(Path(py).with_name("transformers")), "serve", model, "--continuous-batching",
                         "--device", "cpu", "--dtype", dtype, "--cb-block-size", "32", "--cb-num-blocks", "128",
                         "--cb-max-batch-tokens", "512"],
    }
    if gguf and importlib.util.find_spec("llama_cpp") is not None:
        cmds["llama.cpp"] = [py, "-m", "llama_cpp.server", "--model", gguf, "--n_threads", "{threads}"]
    return cmds


def start(name: str, cmd: list[str], threads: int, log_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [c.replace("{threads}", str(threads)) for c in cmd] + ["--port", str(port)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    log = open(log_dir / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of the process and its children (what the server holds at most)."""
    total = 0.0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total or None


async def one_request(client: httpx.AsyncClient, url: str, index: int, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0}
    start_time = time.perf_counter()
    first, text, done = None, [], False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"ok": False, "error": f"HTTP {response.status_code}: {response.text[:200]}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line[6:] == "[DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    return {"ok": False, "error": str(event["error"])[:200]}
                for choice in event.get("choices", []):
                    done = done or bool(choice.get("finish_reason"))  # transformers serve sends no [DONE]
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        first = first or time.perf_counter()
                        text.append(piece)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    end = time.perf_counter()
    if not done:
        return {"ok": False, "error": "stream ended without a finish_reason or data: [DONE]"}
    return {"ok": True, "total_s": end - start_time, "ttft_s": (first or end) - start_time, "text": "".join(text)}


async def run_load(url: str, clients: int, requests: int, max_tokens: int) -> tuple[list, float]:
    counter = iter(range(requests))
    results: list[dict] = []

    async def client_loop(client):
        for index in counter:
            results.append(await one_request(client, url, index, max_tokens))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10), limits=limits) as client:
        begin = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return results, time.perf_counter() - begin


def summarize(results: list[dict], wall: float, tokenizer) -> dict:
    ok = [r for r in results if r["ok"]]
    tokens = sum(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in ok)
    out = {"requests": len(results), "failed": len(results) - len(ok),
           "errors": sorted({r["error"] for r in results if not r["ok"]})[:3], "wall_s": round(wall, 2),
           "requests_per_s": round(len(ok) / wall, 3), "completion_tokens": tokens,
           "tokens_per_s": round(tokens / wall, 2)}
    for name in ("ttft", "total"):
        values = [r[f"{name}_s"] for r in ok]
        for q in (50, 90):
            value = percentile(values, q)
            out[f"{name}_p{q}_s"] = None if value is None else round(value, 3)
    return out


def merge_rounds(rounds: list[dict]) -> dict:
    """Totals over rounds for throughput; percentiles over all requests' values are kept per round, the median
    of the rounds' percentiles is reported."""
    walls = sum(r["wall_s"] for r in rounds)
    merged = {"rounds": len(rounds), "requests": sum(r["requests"] for r in rounds),
              "failed": sum(r["failed"] for r in rounds), "wall_s": round(walls, 2),
              "requests_per_s": round(sum(r["requests"] - r["failed"] for r in rounds) / walls, 3),
              "tokens_per_s": round(sum(r["completion_tokens"] for r in rounds) / walls, 2)}
    for key in ("ttft_p50_s", "ttft_p90_s", "total_p50_s", "total_p90_s"):
        values = sorted(r[key] for r in rounds if r[key] is not None)
        merged[key] = values[len(values) // 2] if values else None
    return merged


def markdown(config: dict, table: dict, endurance: dict | None) -> str:
    f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [f"`python bench/serve.py` on {config['date']}: {config['model']}, {config['cpu']} ({config['cpu_count']} "
             f"cores; {config['cpu_features']}), shared with other work (1-min load average {config['load_before']} "
             f"before, {config['load_after']} after), each server on {config['threads']} torch thread(s), "
             f"{config['dtype']}, max_tokens {config['max_tokens']}, greedy, streaming, loopback; "
             f"{config['rounds']} interleaved round(s).", "",
             "| clients | server | req/s | completion tok/s | TTFT p50 / p90 (s) | latency p50 / p90 (s) | failed | "
             "peak RSS (MB) |", "|---|---|---|---|---|---|---|---|"]
    for load, servers in table.items():
        for name, s in servers.items():
            lines.append(f"| {load} | {LABELS[name]} | {s['requests_per_s']:.2f} | {s['tokens_per_s']:.1f} | "
                         f"{f(s['ttft_p50_s'])} / {f(s['ttft_p90_s'])} | {f(s['total_p50_s'])} / "
                         f"{f(s['total_p90_s'])} | {s['failed']}/{s['requests']} | "
                         f"{config['peak_rss_mb'].get(name) or '–'} |")
    ratios = []
    top, low = table.get(str(max(map(int, table)))), table.get(str(min(map(int, table))))
    if top and "selfcog" in top:
        for peer in ("selfcog-one", "transformers", "llama.cpp"):
            if peer in top and top[peer]["tokens_per_s"]:
                ratios.append(f"{top['selfcog']['tokens_per_s'] / top[peer]['tokens_per_s']:.2f}x {LABELS[peer]}")
    if ratios:
        lines += ["", f"At {max(map(int, table))} clients the batched server's completion tok/s is " +
                  ", ".join(ratios) + "."]
    if low and "selfcog" in low and "selfcog-one" in low and low["selfcog-one"]["total_p50_s"]:
        lines.append(f"At {min(map(int, table))} client its latency p50 is "
                     f"{low['selfcog']['total_p50_s'] / low['selfcog-one']['total_p50_s']:.2f}x the one-at-a-time "
                     "path's.")
    if endurance:
        lines += ["", f"Endurance: {endurance['requests']} requests from {endurance['clients']} clients to the batched "
                  f"selfcog server: {endurance['failed']} failed, {endurance['tokens_per_s']:.1f} completion tok/s, "
                  f"TTFT p50 {f(endurance['ttft_p50_s'])} s."]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [int(k) for k in table]
    names = list(next(iter(table.values())))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        axes[0].plot(loads, [table[str(n)][name]["tokens_per_s"] for n in loads], marker="o", label=LABELS[name])
        axes[1].plot(loads, [table[str(n)][name]["ttft_p50_s"] for n in loads], marker="o", label=LABELS[name])
    axes[0].set(xlabel="concurrent streaming clients", ylabel="completion tokens/s", xscale="log", xticks=loads)
    axes[1].set(xlabel="concurrent streaming clients", ylabel="time to first token, p50 (s)", xscale="log",
                yscale="log", xticks=loads)
    for ax in axes:
        ax.set_xticklabels([str(n) for n in loads])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(args, per_round: dict, endurance: dict | None, load_before: float, load_after: float, rss: dict,
          commands: dict) -> dict:
    """bench/results/serve.{json,md,png}; returns the table."""
    import torch
    import transformers

    table = {load: {name: merge_rounds(rounds) for name, rounds in servers.items()} for load, servers in
             per_round.items()}
    config = {"date": time.strftime("%Y-%m-%d %H:%M %z"), "model": "tiny random model" if args.tiny else
              (args.model or "the embedded SmolLM2-135M-Instruct"), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
              "cpu_features": cpu_features(), "threads": args.threads, "dtype": args.dtype,
              "max_tokens": args.max_tokens, "rounds": args.rounds, "requests_per_client": args.requests_per_client,
              "loads": args.loads, "load_before": load_before, "load_after": load_after,
              "python": platform.python_version(), "torch": torch.__version__,
              "transformers": transformers.__version__, "peak_rss_mb": {k: v and round(v) for k, v in rss.items()},
              "commands": {k: " ".join(v) for k, v in commands.items()}, "machine_shared": True}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"config": config, "table": table, "rounds": per_round,
                                                    "endurance": endurance}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(config, table, endurance))
    plot(table, out.with_suffix(".png"))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="a merged model directory (default: the embedded "
                        "smollm2-135m)")
    parser.add_argument("--tiny", action="store_true", help="the test suite's tiny random model instead")
    parser.add_argument("--loads", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests per client and load, per round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--dtype", default="bfloat16", help="every server's dtype")
    parser.add_argument("--servers", nargs="+", default=["selfcog", "selfcog-one", "transformers", "llama.cpp"])
    parser.add_argument("--gguf", default=None, help="a GGUF export of the model, for llama.cpp")
    parser.add_argument("--endurance", type=int, default=0, help="then N requests per client at the largest load "
                        "against the batched selfcog server")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve"))
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="selfcog-bench-") as tmp:
        if args.tiny:
            model = str(tiny_model(Path(tmp) / "tiny"))
        elif args.model:
            model = args.model
        else:
            from selfcog.models import embedded_model_dir

            model = str(embedded_model_dir())
        tokenizer = AutoTokenizer.from_pretrained(model)
        commands = {k: v for k, v in server_commands(model, args.dtype, args.gguf, max(args.loads)).items()
                    if k in args.servers}
        procs, urls = {}, {}
        try:
            for name, cmd in commands.items():
                procs[name], urls[name] = start(name, cmd, args.threads, Path(tmp))
            for name in commands:
                try:
                    wait_healthy(urls[name], procs[name], 900)
                except SystemExit:
                    print((Path(tmp) / f"{name}.log").read_text()[-3000:], file=sys.stderr)
                    raise
                asyncio.run(run_load(urls[name], 1, 1, 4))  # warm-up, not counted
                print(f"ready: {name} at {urls[name]}", file=sys.stderr, flush=True)
            load_before = round(os.getloadavg()[0], 2)
            per_round: dict[str, dict[str, list]] = {str(n): {k: [] for k in commands} for n in args.loads}
            for round_index in range(args.rounds):
                for clients in args.loads:
                    for name in commands:
                        results, wall = asyncio.run(run_load(urls[name], clients, clients * args.requests_per_client,
                                                             args.max_tokens))
                        summary = summarize(results, wall, tokenizer)
                        per_round[str(clients)][name].append(summary)
                        print(f"round {round_index + 1}, {clients} clients, {name}: {summary['tokens_per_s']} tok/s, "
                              f"TTFT p50 {summary['ttft_p50_s']} s, failed {summary['failed']}", file=sys.stderr,
                              flush=True)
            load_after = round(os.getloadavg()[0], 2)
            rss = {name: peak_rss_mb(proc.pid) for name, proc in procs.items()}
            write(args, per_round, None, load_before, load_after, rss, commands)  # kept if the endurance run is cut
            endurance = None
            if args.endurance and "selfcog" in commands:
                clients = max(args.loads)
                results, wall = asyncio.run(run_load(urls["selfcog"], clients, clients * args.endurance,
                                                     args.max_tokens))
                endurance = {"clients": clients, **summarize(results, wall, tokenizer)}
                print(f"endurance: {endurance}", file=sys.stderr, flush=True)
                rss = {name: peak_rss_mb(proc.pid) for name, proc in procs.items()}
        finally:
            for proc in procs.values():
                stop_server(proc)
    table = write(args, per_round, endurance, load_before, load_after, rss, commands)
    print(Path(args.out).with_suffix(".md").read_text())
    failed = sum(s["failed"] for servers in table.values() for s in servers.values())
    return 1 if failed or (endurance and endurance["failed"]) else 0


if __name__ == "__main__":
    sys.exit(main())
