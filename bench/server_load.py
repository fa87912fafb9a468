"""Load on `sdrt serve`: requests/s and p50/p99 latency of txt2img at several client concurrencies, with and
without --batch-requests. Prints a Markdown table and writes JSON.

Starts one server per --batch-requests value (`python -m sdrt.cli serve MODEL ...` in a subprocess, on a free
loopback port), warms it up with one request, then for each concurrency C runs C client threads that send
--requests txt2img requests in all (each with its own prompt and seed) and times each one. With --url, it
measures a server that is already running instead (its own --batch-requests setting).

    python bench/server_load.py OUT --size 64 --steps 4 --concurrency 1 4 16 --batch-requests 1 4 \
        --json bench/server-load-tiny.json
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import requests

SUBJECTS = ("a red fox", "a lighthouse", "a bowl of fruit", "a city street", "a mountain lake", "an old car")


def payload(i: int, args) -> dict:
    return {"prompt": f"{SUBJECTS[i % len(SUBJECTS)]}, photo {i}", "negative_prompt": "blurry", "seed": 1000 + i,
            "width": args.size, "height": args.size, "steps": args.steps, "sampler_name": args.sampler,
            "cfg_scale": 7.0}


@contextmanager
def server(model: Path, batch_requests: int, args):
    """`sdrt serve` in a subprocess; yields its base URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "sdrt.cli", "serve", str(model), "--port", str(port), "--runtime", args.runtime,
               "--batch-requests", str(batch_requests), "--queue-size", str(max(args.concurrency) * 2)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
            try:
                if requests.get(f"{base}/sdapi/v1/sd-models", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                raise SystemExit("the server did not start within 120 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def measure(base: str, concurrency: int, args) -> dict:
    """``args.requests`` txt2img requests from ``concurrency`` clients: throughput and latency percentiles."""
    count = max(args.requests, concurrency)
    latencies: list[float] = []

    def one(i: int) -> None:
        began = time.perf_counter()
        r = requests.post(f"{base}/sdapi/v1/txt2img", json=payload(i, args), timeout=600)
        r.raise_for_status()
        latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    wall = time.perf_counter() - began
    seconds = np.array(latencies)
    return {"concurrency": concurrency, "requests": count, "seconds": round(wall, 3),
            "requests_per_s": round(count / wall, 3), "p50_s": round(float(np.percentile(seconds, 50)), 3),
            "p99_s": round(float(np.percentile(seconds, 99)), 3)}


def run_levels(base: str, batch_requests: int | None, args) -> list[dict]:
    requests.post(f"{base}/sdapi/v1/txt2img", json=payload(0, args), timeout=600).raise_for_status()   # warm-up
    rows = []
    for concurrency in args.concurrency:
        row = {"batch_requests": batch_requests, **measure(base, concurrency, args)}
        print(f"batch-requests {batch_requests}, concurrency {concurrency}: {row['requests_per_s']} req/s, "
              f"p50 {row['p50_s']} s, p99 {row['p99_s']} s", file=sys.stderr)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| --batch-requests | concurrency | requests | req/s | p50 latency (s) | p99 latency (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch_requests'] or 'server default'} | {r['concurrency']} | {r['requests']} | "
              f"{r['requests_per_s']:.2f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, nargs="?", help="exported folder to serve (or give --url)")
    p.add_argument("--url", help="measure this running server instead, e.g. http://127.0.0.1:7860")
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sampler", default="Euler a")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at least C)")
    p.add_argument("--batch-requests", type=int, nargs="+", default=[1, 4], help="one server run per value")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    if (args.model is None) == (args.url is None):
        p.error("give an exported folder to serve, or --url of a running server")
    rows = []
    if args.url:
        rows += run_levels(args.url.rstrip("/"), None, args)
    else:
        for n in args.batch_requests:
            with server(args.model, n, args) as base:
                rows += run_levels(base, n, args)
    print(table(rows))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "model")}
        args.json.write_text(json.dumps({"model": str(args.model or args.url), "settings": settings,
                                         "machine": {"python": platform.python_version(), "cpus": _cpus()},
                                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "results": rows}, indent=2) + "\n")
    return 0


def _cpus() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    raise SystemExit(main())
