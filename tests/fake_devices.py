"""The environment of a process that fakes several CPU devices (the multi-device checks run as subprocesses).

XLA runs every fake device's thunks on one shared intra-op thread pool, sized to the machine's cores (2 here, read
from NPROC when set). A collective blocks its thread until every device reaches it, so when the blocked collectives
fill the pool, the devices that have not reached them yet cannot run: with NPROC=1 `multidevice_check.py` deadlocks
every time, and with 2 cores it did so under load (XLA aborts the collective after its timeout). A pool of four
threads per device leaves room for every device to reach its collectives.
"""

from __future__ import annotations

import os


def fake_cpu_devices(count: int, environment: dict | None = None) -> dict:
    """Sets `count` fake CPU devices and a large enough thread pool in `environment` (default: this process's, which
    must not have initialised jax yet); returns it."""
    environment = os.environ if environment is None else environment
    flags = environment.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    environment |= {"XLA_FLAGS": flags, "NPROC": str(4 * count)}
    return environment
