"""Pipeline throughput: gate on vs gate off vs a bare loop of the same client.

    python benchmarks/bench_pipeline.py [--artifacts 1000] [--size 262144] [--workers 4]

Downloads the same artifacts over loopback from the package's origin three
ways, in one run, and prints artifacts/s, MB/s and the ratios. Goals: gate on
at >= 85% of gate off, and >= 70% of the bare loop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import multiprocess as mp
import urllib3

from docstokg_idem.core import connect, plan_jobs
from docstokg_idem.core.db import close
from docstokg_idem.pipeline.http import HttpConfig
from docstokg_idem.pipeline.legacy import download_untracked
from docstokg_idem.pipeline.origin import Origin
from docstokg_idem.pipeline.runner import Supervisor
from docstokg_idem.pipeline.worker import WorkerConfig


def bare_loop(urls: list[str], out: str, shard: tuple[int, int]) -> int:
    """GET each URL with urllib3 and write it to a file: no ledger, no fsync, no rename."""
    pool = urllib3.PoolManager()
    index, count = shard
    done = 0
    for n, url in enumerate(urls):
        if n % count != index:
            continue
        resp = pool.request("GET", url, preload_content=False)
        with open(os.path.join(out, f"{n}.bin"), "wb") as f:
            while chunk := resp.read1(64 * 1024):
                f.write(chunk)
        resp.release_conn()
        done += 1
    return done


def timed(label: str, fn, n: int, size: int) -> float:
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    rate = n / elapsed
    print(f"{label:<34} {elapsed:7.2f} s {rate:9.1f} artifacts/s {rate * size / 1e6:8.1f} MB/s")
    return rate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--artifacts", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256 * 1024)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--durable", action="store_true", help="fsync like production (default)")
    args = ap.parse_args(argv)
    names = [f"b{i:05d}.pdf" for i in range(args.artifacts)]
    root = Path(tempfile.mkdtemp(prefix="idem-bench-"))
    ctx = mp.get_context("forkserver")
    print(f"{args.artifacts} artifacts x {args.size} bytes, {args.workers} workers, loopback, "
          f"{os.cpu_count()} cores")
    with Origin({n: args.size for n in names}) as origin:
        urls = [origin.url(n) for n in names]
        rows = [{"work_id": "bench", "artifact_id": n, "url": u} for n, u in zip(names, urls)]
        for n in names:  # generate content before timing
            origin.expected(n)

        def bare() -> None:
            out = root / "bare"
            out.mkdir()
            with ctx.Pool(args.workers) as p:
                p.starmap(bare_loop, [(urls, str(out), (i, args.workers))
                                      for i in range(args.workers)])

        def gate_off() -> None:
            with ctx.Pool(args.workers) as p:
                p.starmap(download_untracked, [(rows, str(root / "off"), HttpConfig(),
                                                (i, args.workers)) for i in range(args.workers)])

        def gate_on() -> None:
            db = root / "jobs.db"
            cx = connect(db)
            plan_jobs(cx, rows)
            close(cx)
            template = WorkerConfig(out_dir=str(root / "on"), db_path=str(db))
            Supervisor(template, workers=args.workers).run()

        bare_rate = timed("bare urllib3 loop", bare, args.artifacts, args.size)
        off_rate = timed("gate off (atomic publish, untracked)", gate_off, args.artifacts, args.size)
        on_rate = timed("gate on (ledger, leases, manifest)", gate_on, args.artifacts, args.size)
    print(f"gate on / gate off  = {on_rate / off_rate:5.2f}   (goal >= 0.85)")
    print(f"gate on / bare loop = {on_rate / bare_rate:5.2f}   (goal >= 0.70)")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
