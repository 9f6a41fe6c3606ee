"""Fine-tune a BERT encoder on Rotten Tomatoes polarity (fresh vs rotten): the fine-tuning base.

Run (SRC: a pretraining workdir, one of its checkpoints/<step> folders, a HuggingFace BERT folder,
or `none` for a random encoder of `model.size` with the tokenizer in `data.tokenizer`, else one
trained on the task's train texts):
    python -m finetune --config configs/finetune_rt_polarity.py --init runs/bert_tiny \
        --workdir runs/ft_rt_polarity
    python -m finetune --config configs/finetune_rt_polarity.py --init runs/bert_tiny \
        --workdir runs/ft_rt_sweep --sweep lr=1e-4,3e-4,1e-3 --seeds 3

Expected: test accuracy above the 0.60 of always answering "fresh" (BERT-base pretrained on
large corpora reaches ~0.85-0.88 on the similar MR snippet set). Measured on 2 CPU cores with
BERT-tiny after the default pretraining (7,000 steps on news, MLM accuracy 0.28), 3 epochs at
lr 5e-4, median of 3 seeds: test 0.733 from it vs 0.736 from a random init. News pretraining
at this budget does not help polarity yet; it does help news topics (reuters_r8: 0.912 vs
0.854). benchmarks/transfer.py runs the comparison.

Every other finetune_*.py config starts from this one and changes a few fields.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.family = "bert"                # the encoder family: models/family.py

    # The encoder's shape comes from --init; these apply only with --init none (size,
    # vocab_size, max_position), or always (dropout, attention, dtype, remat, classifier_dropout, pooling).
    c.model = ml_collections.ConfigDict()
    c.model.size = "tiny"
    c.model.vocab_size = 0           # 0: the tokenizer's, rounded up to a multiple of 128
    c.model.max_position = 512
    c.model.dtype = "float32"
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.1
    c.model.attention = "auto"       # models/layers.py ATTENTIONS (training with attention dropout: reference)
    c.model.classifier_dropout = 0.1
    c.model.pooling = "cls"          # cls: BERT's pooler (exports as BertForSequenceClassification)
                                     # mean: the mean hidden state (the usual frozen-feature probe)
    c.model.remat = "none"
    c.model.scan_layers = False      # true: refuses method.freeze_bottom and method.layer_decay

    c.data = ml_collections.ConfigDict()
    c.data.task = "rt_polarity"      # see data/tasks.py: rt_polarity, reuters_r8, newsgroups20, glue/...
    c.data.data_dir = "~/.cache/pretrax"  # wheels cache and prepared TFDS datasets
    c.data.tokenizer = ""            # --init none only: a tokenizer folder; empty: train WordPiece
    c.data.vocab_size = 8192         # --init none without data.tokenizer: the trained vocabulary
    c.data.max_seq_len = 64
    c.data.max_train_examples = 0    # >0: a fixed subset of the train split (same for all seeds)
    c.data.max_eval_examples = 0     # >0: the first examples of a fixed shuffle of dev and test
    # Span tasks only (squad:DIR, squad/v1.1, squad/v2.0; configs/finetune_squad.py):
    c.data.doc_stride = 128          # a long context's windows start this many tokens apart
    c.data.max_query_len = 64        # question tokens kept
    c.data.max_answer_len = 30       # tokens in a decoded answer, at most
    c.data.n_best = 20               # start and end candidates per window

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 3.0
    c.train.steps = 0                # >0 overrides epochs
    c.train.batch_size = 32          # global, over all processes
    c.train.grad_accum = 1
    c.train.seed = 0                 # head init, dropout and data order
    c.train.log_every = 50

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.warmup_steps = -1        # -1: warmup_ratio of all steps
    c.optim.warmup_ratio = 0.1
    c.optim.decay = "linear"         # linear | cosine | constant
    c.optim.decay_steps = 0          # 0: decay over all steps after warmup; N: only the last N
    c.optim.end_lr_ratio = 0.0
    c.optim.weight_decay = 0.01      # never on norms, biases, or frozen parameters
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-6
    c.optim.clip_norm = 1.0

    c.method = ml_collections.ConfigDict()
    c.method.freeze_encoder = False  # train only the classifier (a linear probe of the pooler)
    c.method.freeze_bottom = -1      # k >= 0: freeze the embeddings and the bottom k layers
    c.method.l2sp_alpha = 0.0        # > 0: add alpha/2 * ||w - w0||^2 over the trained encoder
    c.method.layer_decay = 1.0       # < 1: layer l of L learns at lr * decay^(L + 1 - l)
    c.method.label_smoothing = 0.0
    c.method.mixup_alpha = 0.0       # image families only (finetune/image.py)
    c.method.cutmix_alpha = 0.0
    # Magnitude pruning (training/pruning.py): the encoder's layer matrices reach `sparsity` and
    # each attention block loses `prune_heads` of its heads (lowest weight norm), on Zhu & Gupta's
    # cubic ramp from step prune_start to prune_end, new masks every prune_every steps.
    c.method.sparsity = 0.0          # in [0, 1): the share of each matrix's weights set to zero
    c.method.prune_heads = 0.0       # in [0, 1): the share of each layer's heads removed whole
    c.method.prune_start = 0
    c.method.prune_end = -1          # -1: at two thirds of the run (the rest recovers)
    c.method.prune_every = 10
    c.method.quantize = "none"       # int8: quantisation-aware fine-tuning (qwix, straight-through)
    c.method.quantize_after = "none"  # int8: also score the best checkpoint's int8 weights
    c.method.distill_from = ""       # a fine-tuned teacher (finetune/distill.py); "": no distillation
    c.method.distill_temperature = 2.0
    c.method.distill_alpha = 0.5     # alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE
    c.method.distill_dtype = "float32"  # the teacher's weights and compute: float32 | bfloat16

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 0     # 0: at every evaluation (and on stop)
    c.checkpoint.every_seconds = 0.0 # > 0: also save when this much wall-clock time has passed
    c.checkpoint.keep = 1

    # A multi-process run: a lost process (no heartbeat this long) stops the others; processes
    # that end wait this long for each other (training/distributed.py).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.heartbeat_timeout_s = 30
    c.distributed.shutdown_timeout_s = 60

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0           # 0: once per epoch (and at the end)
    c.eval.batch_size = 0            # 0: train.batch_size

    c.perf = ml_collections.ConfigDict()
    c.perf.peak_tflops = 0.0         # peak TFLOP/s per device for perf/mfu; 0 looks the chip up

    c.profile = ml_collections.ConfigDict()
    c.profile.steps = ""             # START:COUNT: a jax.profiler trace of those steps in workdir/profile/
    c.profile.all_processes = False  # every process traces (else process 0 only)

    c.wandb = ml_collections.ConfigDict()
    c.wandb.project = ""

    # --search N: the fields a study tunes and their ranges, "KEY=float:LOW:HIGH[:log],
    # KEY=int:LOW:HIGH,KEY=choice:A|B|C" (training/search.py)
    c.search = ml_collections.ConfigDict()
    c.search.space = ""
    return c
