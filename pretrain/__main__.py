"""`python -m pretrain [--config configs/NAME.py] [--workdir DIR] [--config.FIELD=VALUE ...]`.

With no flags it runs the embedded default; the same command on the same workdir resumes.
"""

import sys
from pathlib import Path

import configs
from training.config import parse_cli
from training.errors import exits_cleanly


@exits_cleanly
def main(argv=None) -> None:
    config, args = parse_cli(sys.argv[1:] if argv is None else argv, str(Path(configs.__file__).with_name("bert_tiny.py")),
                             "Pretrain a BERT encoder with MLM and NSP.")
    from pretrain.train import train_and_evaluate  # after parsing: --help stays instant
    train_and_evaluate(config, args.workdir)


if __name__ == "__main__":
    main()
