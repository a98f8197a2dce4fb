"""Forward + backward of single MiT operations at the benchmark's shapes, two ways each.

    python benchmarks/micro_ops.py

Batch 2 of 320 x 448 padded frames (cpu_throughput.py's): the token maps are 80x112, 40x56,
20x28 and 10x14 at strides 4-32, and spatial reduction leaves 140 keys at stages 1-3.
- attention: fused `scaled_dot_product_attention` (the default) vs explicit softmax(QK^T)V;
- spatial reduction: the conv with kernel = stride = r (the model's) vs the same arithmetic as
  one matmul over r x r patches (tried, not adopted: docs/performance.md).
Prints a table and writes benchmarks/results/micro_ops.json.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

from common import write_results

ATTENTION_SHAPES = ((1, 8960, 140), (2, 2240, 140), (5, 560, 140), (8, 140, 140))  # heads, N, keys
REDUCTION_SHAPES = ((80, 112, 64, 8), (40, 56, 128, 4), (20, 28, 320, 2))  # H, W, C, ratio
BATCH, HEAD_DIM = 2, 64


def milliseconds(step, repeats: int) -> float:
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats * 1e3


def attention_steps(heads: int, tokens: int, keys: int):
    q = torch.randn(BATCH, heads, tokens, HEAD_DIM, requires_grad=True)
    k = torch.randn(BATCH, heads, keys, HEAD_DIM, requires_grad=True)
    v = torch.randn(BATCH, heads, keys, HEAD_DIM, requires_grad=True)
    grad = torch.randn(BATCH, heads, tokens, HEAD_DIM)

    def fused():
        F.scaled_dot_product_attention(q, k, v).backward(grad)

    def explicit():
        ((q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5).softmax(-1) @ v).backward(grad)

    return fused, explicit


def reduction_steps(height: int, width: int, channels: int, ratio: int):
    tokens = torch.randn(BATCH, height * width, channels, requires_grad=True)
    weight = torch.randn(channels, channels, ratio, ratio, requires_grad=True)
    bias = torch.randn(channels, requires_grad=True)
    rows, cols = height // ratio, width // ratio
    grad = torch.randn(BATCH, rows * cols, channels)

    def conv():
        grid = tokens.transpose(1, 2).reshape(BATCH, channels, height, width)
        F.conv2d(grid, weight, bias, stride=ratio).flatten(2).transpose(1, 2).backward(grad)

    def patch_matmul():
        patches = (tokens.reshape(BATCH, rows, ratio, cols, ratio, channels)
                   .permute(0, 1, 3, 2, 4, 5).reshape(BATCH, rows * cols, -1))
        flat_weight = weight.permute(0, 2, 3, 1).reshape(channels, -1)
        F.linear(patches, flat_weight, bias).backward(grad)

    return conv, patch_matmul


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", default="benchmarks/results/micro_ops.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    results = []
    for heads, tokens, keys in ATTENTION_SHAPES:
        fused, explicit = attention_steps(heads, tokens, keys)
        results.append({"op": "attention", "shape": f"{heads} heads, {tokens} x {keys}",
                        "default_ms": milliseconds(fused, args.repeats),
                        "alternative_ms": milliseconds(explicit, args.repeats)})
    for height, width, channels, ratio in REDUCTION_SHAPES:
        conv, patch_matmul = reduction_steps(height, width, channels, ratio)
        results.append({"op": "spatial reduction",
                        "shape": f"{channels} x {height} x {width}, r={ratio}",
                        "default_ms": milliseconds(conv, args.repeats),
                        "alternative_ms": milliseconds(patch_matmul, args.repeats)})
    print(tabulate([(r["op"], r["shape"], f"{r['default_ms']:.2f}", f"{r['alternative_ms']:.2f}")
                    for r in results],
                   headers=("op", "shape", "default ms (SDPA / conv)",
                            "alternative ms (explicit / patch matmul)"), tablefmt="github"))
    write_results(args, results=results)


if __name__ == "__main__":
    main()
