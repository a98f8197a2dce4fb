"""engine/host_memory: freed blocks stay in the process, so allocating them again costs no
page faults. Each case runs in a fresh interpreter because the setting is process-wide."""

import json
import subprocess
import sys

import pytest

PAGE_COUNTING_CHILD = r"""
import json, resource, sys
import torch
from crossdet_ray.engine.host_memory import retain_freed_host_memory

applied = retain_freed_host_memory() if sys.argv[1] == "retain" else None
faults = []
# 64, 60, 56 MiB: above glibc's largest mmap threshold (32 MiB); each fits where the last was
for mebibytes in (64, 60, 56):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(mebibytes * 2**20 // 4)
    block.fill_(1.0)  # touch every page
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""

PAGES_IN_SMALLEST_BLOCK = 56 * 2**20 // 4096


def faults_per_allocation(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PAGE_COUNTING_CHILD, mode],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    default = faults_per_allocation("default")
    retained = faults_per_allocation("retain")
    assert retained["applied"] is True
    # By default every block is a fresh mmap: each of its pages faults again.
    assert all(count >= PAGES_IN_SMALLEST_BLOCK * 0.9 for count in default["faults"])
    # Retained: the first block's pages fault in once; the later blocks reuse them.
    assert retained["faults"][0] >= PAGES_IN_SMALLEST_BLOCK * 0.9
    assert all(count < PAGES_IN_SMALLEST_BLOCK * 0.05 for count in retained["faults"][1:])
