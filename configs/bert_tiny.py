"""BERT-tiny (2 layers, 128 hidden) MLM + NSP on the embedded English news corpus, with a WordPiece
vocabulary; also the shared groups every other config starts from. (The default run,
`python -m pretrain` with no flags, is configs/modernbert_tiny.py.)

Run:
    python -m pretrain --config configs/bert_tiny.py      # into runs/bert_tiny

Continued pretraining (weights, tokenizer and model shape from --init, a fresh optimizer and
step; the new corpus is tokenised with that tokenizer), e.g. task-adaptive on rt_polarity's train
texts, or on a mixture of sources with weights:
    python -m pretrain --config configs/bert_tiny.py --init runs/bert_tiny --workdir runs/tapt_rt \
        --config.data.source=task:rt_polarity --config.data.objective=mlm_packed
    python -m pretrain --config configs/bert_tiny.py --init runs/bert_tiny --workdir runs/mix \
        --config.data.source=news:0.7,task:rt_polarity:0.3

Measured on 2 CPU cores (2026-11-23, clean clone, install included): 16.7 minutes, ~14-17k
tokens/s; eval/mlm_accuracy 0.0002 at step 0 -> 0.113 (1000) -> 0.168 (3000) -> 0.241 (5000)
-> 0.283 (7000), eval/nsp_accuracy 0.66. A counting baseline that predicts a masked token from
both neighbours gets 0.29 (benchmarks/mlm_context_baseline.py).

Why this shape for a 20-minute budget: BERT-tiny first learns unigram statistics and sits on
that plateau (attention nearly uniform, eval/mlm_accuracy ~0.13) until it has seen 90-150k rows
at a high learning rate (in our runs). 64-token rows give twice the rows per second of 128; dropout off (as in
Cramming) and a learning rate held at 1e-3 until the last 1,500 steps (optim.decay_steps) make
it leave the plateau near step 3,000 and learn from its context after. With 128-token rows,
dropout 0.1 and linear decay over 3,000 steps it never left (0.132), and fine-tuning from it
lost to a random init (benchmarks/transfer.py).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.family = "bert"                # the model family: models/family.py

    c.model = ml_collections.ConfigDict()
    c.model.size = "tiny"            # with --init: SRC's shape (size, vocab_size, max_position)
    c.model.vocab_size = 0           # set by the run: the tokenizer's, rounded up to a multiple of 128
    c.model.max_position = 512
    c.model.dtype = "float32"        # compute dtype; parameters stay float32
    c.model.dropout = 0.0            # off for a short budget, as in Cramming (BERT used 0.1)
    c.model.attention_dropout = 0.0
    c.model.attention = "auto"       # auto: cuDNN flash on GPU in bf16, the einsums elsewhere; attention
                                     # dropout > 0 always runs the reference einsums (models/layers.py)
    c.model.remat = "none"           # rematerialisation: none | full | dots | dots_no_batch
    c.model.scan_layers = False      # one scanned layer over stacked weights: compiles in seconds

    c.data = ml_collections.ConfigDict()
    c.data.source = "news"           # news | pydocs | files:/path/*.txt|*.jsonl | tfds:NAME[:SPLIT]
                                     # | task:NAME (a fine-tuning task's train texts), or a mixture
                                     # SOURCE:WEIGHT,SOURCE:WEIGHT,... (news:0.7,task:rt_polarity:0.3)
    c.data.data_dir = "~/.cache/pretrax"  # TFDS datasets and prepared data (data_dir/prepared)
    c.data.tokenizer = ""            # a tokenizer / HuggingFace model folder; empty: train WordPiece
                                     # (on every source of a mixture); with --init: SRC's, always
    c.data.objective = "nsp"         # nsp | sop (sentence order) | mlm_packed (MLM only, no NSP loss)
    c.data.seed = 0                  # eval split and pair cutting (train.seed: shuffle and masks)
    c.data.vocab_size = 8192
    c.data.max_seq_len = 64
    c.data.max_predictions = 10
    c.data.mask_prob = 0.15
    c.data.whole_word = False
    c.data.short_seq_prob = 0.1
    c.data.dupe_factor = 5
    c.data.eval_fraction = 0.02
    c.data.max_doc_tokens = 100_000  # longer documents are split into several
    c.data.shard_documents = 2000    # documents per prepared shard (a unit of parallel work)
    c.data.strict = False            # True: a bad JSONL line refuses the corpus; False: skipped and counted
    c.data.max_skipped_share = 0.1   # more bad JSONL lines than this share: refused (the field name is wrong?)
    c.data.prepare_workers = 0       # tokenising processes; -1: one per CPU, 0: this process (fastest on 2 cores)
    c.data.workers = 0               # grain worker processes making batches; 0: threads only
    c.data.prefetch = 4              # batches read ahead

    c.train = ml_collections.ConfigDict()
    c.train.steps = 7000
    c.train.batch_size = 32          # global, over all processes
    c.train.grad_accum = 1
    # Batch-size warmup (ModernBERT's, data/pipeline.py BatchWarmup): the first steps take
    # batch_warmup_start rows, then each multiple of it up to batch_size for an equal share of
    # batch_warmup_steps steps; a resume takes the same rows. 0 steps: off.
    c.train.batch_warmup_steps = 0
    c.train.batch_warmup_start = 0   # a divisor of batch_size and a multiple of mesh.data x mesh.fsdp
    c.train.seed = 0
    c.train.log_every = 50

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 300
    c.optim.decay = "linear"         # linear | cosine | constant
    c.optim.decay_steps = 1500        # hold lr after warmup, decay over the last N steps; 0: all
    c.optim.end_lr_ratio = 0.0
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-6
    c.optim.clip_norm = 1.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                 # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500
    c.checkpoint.every_seconds = 0.0     # > 0: also save when this much wall-clock time has passed
                                         # (process 0's clock, read at each log step); 0 = off
    c.checkpoint.keep = 2

    # A multi-process run: a lost process (no heartbeat this long) stops the others; processes
    # that end wait this long for each other (training/distributed.py).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.heartbeat_timeout_s = 30
    c.distributed.shutdown_timeout_s = 60

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 500
    c.eval.max_batches = 50

    c.perf = ml_collections.ConfigDict()
    # Peak TFLOP/s per device for MFU; 0 looks the chip up. 0.19 is the float32 matmul peak
    # measured on the 2-core development machine; set yours on other CPUs.
    c.perf.peak_tflops = 0.19

    c.profile = ml_collections.ConfigDict()
    c.profile.steps = ""             # START:COUNT: a jax.profiler trace of those steps in workdir/profile/
    c.profile.all_processes = False  # every process traces (else process 0 only)

    c.wandb = ml_collections.ConfigDict()
    c.wandb.project = ""             # non-empty: also log to this W&B project

    # Pretraining distillation (pretrain/distill.py): a pretraining workdir teaches a student of
    # its shape with fewer layers, started from every other teacher layer (DistilBERT).
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ""           # "": no distillation
    c.distill.student_layers = 0     # 0: half the teacher's
    c.distill.init_from_teacher = True
    c.distill.temperature = 2.0
    c.distill.alpha_soft = 5.0       # DistilBERT's weights: soft MLM targets, labels, hidden-state cosine
    c.distill.alpha_mlm = 2.0
    c.distill.alpha_cos = 1.0
    c.distill.dtype = "float32"      # the teacher's weights and compute: float32 | bfloat16

    # --search N: the fields a study tunes and their ranges, "KEY=float:LOW:HIGH[:log],
    # KEY=int:LOW:HIGH,KEY=choice:A|B|C" (training/search.py)
    c.search = ml_collections.ConfigDict()
    c.search.space = ""
    return c
