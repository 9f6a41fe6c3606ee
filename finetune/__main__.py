"""`python -m finetune --config configs/NAME.py --init SRC --workdir DIR [--config.FIELD=VALUE ...]`.

SRC: a pretraining workdir (its latest checkpoint), one checkpoints/<step> folder, a HuggingFace
BERT folder, or `none`. `--sweep KEY=V1,V2,... [--sweep ...] --seeds N` runs a grid of settings
over N seeds in DIR/<setting>/seed<k> and writes DIR/sweep.json. `--search N [--search-storage
URL]` runs an optuna study over `search.space` in DIR/trials/<n> (training/search.py). The same
command on the same workdir resumes.
"""

import sys
from pathlib import Path

import configs
from training import distributed
from training.config import parse_cli
from training.errors import UserError, exits_cleanly
from training.search import SEARCH_ARGS

EXTRA_ARGS = [
    ("--init", dict(required=True, metavar="SRC",
                    help="pretraining workdir, checkpoints/<step> folder, HuggingFace BERT folder, or none")),
    ("--sweep", dict(action="append", default=[], metavar="KEY=V1,V2,...",
                     help="sweep a config field (lr, l2sp_alpha, ... or a full key); repeat for a grid")),
    ("--seeds", dict(type=int, default=0, metavar="N",
                     help="run each setting with seeds train.seed + 0..N-1 and report medians")),
]


@exits_cleanly
def main(argv=None) -> None:
    config, args = parse_cli(sys.argv[1:] if argv is None else argv,
                             str(Path(configs.__file__).with_name("finetune_rt_polarity.py")),
                             "Fine-tune a BERT encoder on a labelled task.",
                             EXTRA_ARGS + SEARCH_ARGS + list(distributed.DISTRIBUTED_ARGS))
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.cpu_devices,
                           **distributed.timeouts(config))
    # Imported after parsing: --help stays instant.
    if args.search:
        if args.sweep or args.seeds:
            raise UserError("--search and --sweep/--seeds are two ways to choose settings; pass one")
        from finetune.sweep import search_trainer
        from training.search import run_search
        run_search(config, args.workdir, args.search, args.search_storage,
                   search_trainer(config, args.init, set(args.overrides)))
    elif args.sweep or args.seeds:
        from finetune.sweep import run_sweep
        from training import storage
        from training.lease import WorkdirLease
        with WorkdirLease(storage.check_writable(args.workdir, "--workdir")):  # the grid's folder; each run leases its own too
            run_sweep(config, args.workdir, args.init, args.sweep, max(args.seeds, 1), set(args.overrides))
    else:
        from finetune.train import train_and_evaluate
        train_and_evaluate(config, args.workdir, args.init, set(args.overrides))


if __name__ == "__main__":
    main()
