"""Peak memory (VmHWM) and wall time of a short FairFAL run: 2 cycles x 3 rounds x 1 local
epoch, scratch local models of 10 epochs (issue 4's memory gap). Run it under different
environments to compare, e.g.

    python benchmarks/memory_probe.py /tmp/probe
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 python benchmarks/memory_probe.py /tmp/probe
"""

import sys
import time
from pathlib import Path

from falkit import config as config_mod
from falkit.loop import run

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    t = time.perf_counter()
    cfg = config_mod.load(ROOT / "configs" / "fmnist_lt.toml", overrides={
        "budget.cycles": "2", "fl.rounds": "3", "fl.local_epochs": "1", "out_dir": sys.argv[1],
        "strategy": "fairfal", "local_model.epochs": "10", "local_model.decay_epoch": "8"})
    run(cfg, overwrite=True)
    status = Path("/proc/self/status").read_text().splitlines()
    hwm = next(int(x.split()[1]) for x in status if x.startswith("VmHWM:"))
    print(f"peak RSS {hwm // 1024} MiB, {time.perf_counter() - t:.1f} s")
