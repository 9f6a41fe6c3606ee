"""`python -m pretrain [--config configs/NAME.py] [--workdir DIR] [--init SRC] [--config.FIELD=VALUE ...]`.

With no flags it runs the default, configs/modernbert_tiny.py (configs.PRETRAIN_DEFAULT), into
runs/modernbert_tiny; the same command on the same workdir resumes. `--init SRC` continues
pretraining from SRC's weights (a pretraining workdir, one of its checkpoints/<step> folders, or a
HuggingFace folder of the config's family), with SRC's tokenizer and model shape and a fresh
optimizer and step.
Multi-process: `--coordinator HOST:PORT --num_processes N --process_id I` on every process (or
nothing on TPU pods and under srun, which are detected); `--cpu_devices M` fakes M CPU devices.
`python -m launch.local` starts such runs on one machine (see launch/README.md).
`--search N [--search-storage URL]`: an optuna study over `search.space`, each trial a run in
WORKDIR/trials/<n>, scored by its eval loss (training/search.py).
"""

import sys

import configs
from training import distributed
from training.config import parse_cli
from training.errors import exits_cleanly
from training.search import SEARCH_ARGS

INIT_ARG = ("--init", dict(default=None, metavar="SRC",
                           help="continue from SRC's weights: a pretraining workdir, a "
                                "checkpoints/<step> folder, or a HuggingFace folder"))


@exits_cleanly
def main(argv=None) -> None:
    config, args = parse_cli(sys.argv[1:] if argv is None else argv, configs.PRETRAIN_DEFAULT,
                             "Pretrain an encoder (default: ModernBERT-tiny, MLM on packed rows).",
                             extra_args=[INIT_ARG, *SEARCH_ARGS, *distributed.DISTRIBUTED_ARGS])
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.cpu_devices,
                           **distributed.timeouts(config))
    from pretrain.train import search_trainer, train_and_evaluate  # after parsing: --help stays instant
    if args.search:
        from training.search import run_search
        run_search(config, args.workdir, args.search, args.search_storage,
                   search_trainer(args.init, set(args.overrides)))
    else:
        train_and_evaluate(config, args.workdir, args.init, set(args.overrides))


if __name__ == "__main__":
    main()
