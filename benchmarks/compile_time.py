"""bert_large's train step compile time: the unrolled layer stack against the scanned one.

    python benchmarks/compile_time.py [--config configs/bert_large.py] [--mesh 1,1,1] [--batch 8]

One measurement each (lowering to StableHLO, then XLA compilation) of the real train step
(benchmarks/memory_plan.py `compile_train_step`) on abstract inputs, so nothing is allocated;
the config's remat policy is kept, only `model.scan_layers` differs. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/bert_large.py")
    parser.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor")
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--layouts", default="scanned,unrolled")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.mesh.split(","))
    from benchmarks.memory_plan import _fake_devices, compile_train_step
    _fake_devices(shape[0] * shape[1] * shape[2])
    from training.config import load_config
    config = load_config(args.config)
    print(f"{args.config}: model.size={config.model.size} remat={config.model.remat} "
          f"seq={config.data.max_seq_len} batch={args.batch} mesh={shape}")
    for layout in args.layouts.split(","):
        _, _, lower_s, compile_s = compile_train_step(config, shape, args.batch,
                                                      scan_layers=layout == "scanned")
        print(f"{layout:>9}: lower {lower_s:6.1f} s, compile {compile_s:6.1f} s, "
              f"total {lower_s + compile_s:6.1f} s", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
