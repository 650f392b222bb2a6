"""The environment of a process that fakes several CPU devices (the multi-device checks run as subprocesses).

XLA offloads some of every fake device's thunks to one shared intra-op thread pool, sized to the machine's cores (2
here, read from NPROC when set). A collective blocks its thread until every device reaches it, so when blocked
collectives fill the pool, the devices that have not reached them yet may be unable to run. `multidevice_check.py`
deadlocked so (XLA aborts the collective after its timeout) in 2 of 4 runs at the default pool on 2 cores and in 1 of
2 at NPROC=1; the likely cause, not a proven one. A pool of four threads per device leaves room for every device to
reach its collectives.
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
