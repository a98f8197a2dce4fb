"""A dataset in a bucket: the driver's preflight time and a node's download rate, against a
local S3-compatible server (moto's, in a process of its own).

    python benchmarks/bucket_data.py                          # 10,000 frames, then 100 big ones
    python benchmarks/bucket_data.py --preflight-frames 2000 --fetch-frames 50

- Preflight: `--preflight-frames` small frames (32x32, one box each) and their labels are
  uploaded, then `inspect_remote_dataset` times the listing, every label read and every
  frame's header read (4 requests a frame: HEAD and GET for the label, HEAD and a ranged GET
  for the header).
- Fetch: `--fetch-frames` frames of `--fetch-size` (HxW, uint8) are uploaded and
  `fetch_remote_dataset` downloads them into an empty cache with its parallel streams, checking
  each against the listing; then a second call times the re-use of the node's copy.

Prints a table and writes benchmarks/results/bucket_data.json. Every figure includes the
local server's own time: a Python server on the same (small) machine, not S3 itself.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tabulate import tabulate

from common import write_results

BUCKET = "crossdet-bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preflight-frames", type=int, default=10_000)
    parser.add_argument("--fetch-frames", type=int, default=100)
    parser.add_argument("--fetch-size", default="480x640", help="HxW of the fetched frames")
    parser.add_argument("--output", default="benchmarks/results/bucket_data.json")
    return parser


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _upload(client, prefix: str, count: int, height: int, width: int) -> int:
    frame = _npy_bytes(np.random.default_rng(0).integers(0, 255, (height, width, 5),
                                                          dtype=np.uint8))
    label = b"0 0.5 0.5 0.25 0.25\n"

    def put(index: int) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/images/{index:06d}.npy", Body=frame)
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/labels/{index:06d}.txt", Body=label)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(put, range(count)))
    return count * (len(frame) + len(label))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.update(CREDENTIALS)
    import boto3

    from crossdet_ray.data.remote import fetch_remote_dataset, inspect_remote_dataset

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}",
                              region_name="us-east-1")
        for _ in range(100):
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:  # the server is still starting
                time.sleep(0.1)

        def uri(prefix: str) -> str:
            return (f"s3://{BUCKET}/{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http"
                    "&region=us-east-1")

        _upload(client, "small", args.preflight_frames, 32, 32)
        start, cpu_start = time.perf_counter(), time.process_time()
        listing, report = inspect_remote_dataset(uri("small"))
        preflight_sec = time.perf_counter() - start
        preflight_cpu_sec = time.process_time() - cpu_start  # this process's, not the server's
        assert report.num_usable == args.preflight_frames

        height, width = (int(v) for v in args.fetch_size.split("x"))
        total = _upload(client, "big", args.fetch_frames, height, width)
        big, _ = inspect_remote_dataset(uri("big"))
        with tempfile.TemporaryDirectory() as cache:
            first = fetch_remote_dataset(big, Path(cache))
            start = time.perf_counter()
            again = fetch_remote_dataset(big, Path(cache))
            reuse_sec = time.perf_counter() - start
        assert first.bytes_downloaded == total and again.reused
    finally:
        server.terminate()
        server.wait(timeout=30)

    rows = [("preflight", f"{args.preflight_frames} frames + labels (32x32)",
             f"{preflight_sec:.1f} s", f"{args.preflight_frames / preflight_sec:.0f} frames/s"),
            ("fetch, empty cache", f"{args.fetch_frames} frames {args.fetch_size} "
             f"({total / 1e6:.0f} MB)", f"{first.seconds:.1f} s",
             f"{first.megabytes_per_second:.0f} MB/s"),
            ("fetch, node's copy", "the same", f"{reuse_sec * 1000:.1f} ms", "-")]
    print(tabulate(rows, headers=("step", "dataset", "time", "rate"), tablefmt="github"))
    print(f"preflight CPU time of this process (the server's not counted): "
          f"{preflight_cpu_sec:.1f} s; load average: {os.getloadavg()}")
    write_results(args, preflight_sec=preflight_sec, preflight_frames=args.preflight_frames,
                  preflight_cpu_sec=preflight_cpu_sec,
                  fetch_sec=first.seconds, fetch_bytes=first.bytes_downloaded,
                  fetch_mb_per_sec=first.megabytes_per_second, reuse_sec=reuse_sec,
                  load_average=os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
