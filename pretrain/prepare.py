"""`python -m pretrain.prepare [--config configs/NAME.py] [--config.FIELD=VALUE ...]`: prepare a
pretraining corpus ahead of time (data/preparation.py; `python -m pretrain` prepares when needed).
Takes the same multi-process flags as `python -m pretrain`; every process prepares its share."""

import sys

from data.preparation import prepare
from training import distributed
from training.config import parse_cli
from training.errors import exits_cleanly


@exits_cleanly
def main(argv=None) -> None:
    import configs
    config, args = parse_cli(sys.argv[1:] if argv is None else argv,
                             configs.PRETRAIN_DEFAULT,
                             "Tokenise a text source into pretraining examples (cached).",
                             extra_args=distributed.DISTRIBUTED_ARGS)
    if distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                              args.cpu_devices, **distributed.timeouts(config)):
        import jax
        prepare(config.data, process_index=jax.process_index(), process_count=jax.process_count())
    else:
        prepare(config.data)


if __name__ == "__main__":
    main()
