"""How much of MLM accuracy needs only the neighbouring tokens? A counting baseline.

    python benchmarks/mlm_context_baseline.py PRETRAIN_WORKDIR [--heldout 0.05]

Tokenises the run's corpus (`data.source` in its config.json) with the run's tokenizer, counts on
the first documents and predicts every token of the held-out last `--heldout` of them three ways:
the most frequent token (unigram), the most frequent successor of the left neighbour (bigram),
and the most frequent token between the left and right neighbours (backing off to the bigram).
An encoder whose eval/mlm_accuracy sits below the third number has not yet learned to read even
its immediate neighbours; its features carry little beyond word frequency.

Measured on the news corpus with the default run's 8,192-token vocabulary (2026-11-23):
unigram 0.047, bigram 0.164, left+right 0.292, against the default run's eval/mlm_accuracy of
0.283 after 7,000 BERT-tiny steps (the former default, 3,000 steps of 128 tokens, sat at 0.138).
"""

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.corpora import load_documents  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402


def neighbour_accuracies(train: list[list[int]], heldout: list[list[int]]) -> dict[str, float]:
    unigram = collections.Counter()
    after = collections.defaultdict(collections.Counter)
    between = collections.defaultdict(collections.Counter)
    for ids in train:
        unigram.update(ids)
        for i in range(1, len(ids) - 1):
            after[ids[i - 1]][ids[i]] += 1
            between[ids[i - 1], ids[i + 1]][ids[i]] += 1
    top = unigram.most_common(1)[0][0]
    best_after = {k: c.most_common(1)[0][0] for k, c in after.items()}
    best_between = {k: c.most_common(1)[0][0] for k, c in between.items() if c.total() >= 2}
    hits = {"unigram": 0, "bigram": 0, "left+right": 0}
    n = 0
    for ids in heldout:
        for i in range(1, len(ids) - 1):
            n += 1
            bigram = best_after.get(ids[i - 1], top)
            hits["unigram"] += ids[i] == top
            hits["bigram"] += ids[i] == bigram
            hits["left+right"] += ids[i] == best_between.get((ids[i - 1], ids[i + 1]), bigram)
    return {name: h / max(n, 1) for name, h in hits.items()} | {"heldout_tokens": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", help="a pretraining workdir (its config.json and tokenizer/)")
    parser.add_argument("--heldout", type=float, default=0.05, help="fraction of documents held out")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    data = json.loads((workdir / "config.json").read_text())["data"]
    docs = load_documents(data["source"], Path(data["data_dir"]).expanduser())
    ids = Tokenizer.load(workdir / "tokenizer").encode_batch(docs)
    cut = int(len(ids) * (1 - args.heldout))
    result = neighbour_accuracies(ids[:cut], ids[cut:])
    print(json.dumps({"source": data["source"], **result}, indent=1))


if __name__ == "__main__":
    main()
