"""Extractive question answering: SQuAD-format questions, and the windows a long context is cut into.

Sources (`load_squad`): `squad:DIR` reads DIR/train.json and DIR/dev.json in SQuAD's JSON format
(v1.1, or v2.0 with `is_impossible`); `squad/v1.1` and `squad/v2.0` read TFDS's `squad` through
`tfds.data_source` (no TensorFlow) from a data dir prepared in array_record format, like GLUE.
Every answer is checked against its context when read: an `answer_start` where the context does
not hold the answer's text is one DataError naming the file and the question id.

`Windows` is a split of the fine-tuning trainer: one row per window, BERT's run_squad scheme. A
context longer than `max_seq_len - len(question) - 3` tokens is cut into windows that start
`doc_stride` tokens apart, each `[CLS] question [SEP] context window [SEP]`; a window's label is
the answer's first and last token, or [CLS] (position 0) where the window does not hold the whole
answer, as for an impossible question. The answer decoded from a window is the context's own
characters between its tokens' offsets, so it never depends on how the tokenizer normalises.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from data.wheels import DataError

TFDS_NAMES = ("squad/v1.1", "squad/v2.0")
_TFDS_SPLITS = {"train": "train", "dev": "validation"}


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    question: str
    context: str
    answers: tuple[str, ...]  # every gold answer text (empty for an impossible question)
    starts: tuple[int, ...]   # their character offsets in the context

    @property
    def impossible(self) -> bool:
        return not self.answers


def load_squad(name: str, data_dir: Path) -> tuple[dict[str, list[Question]], bool]:
    """({"train": [...], "dev": [...]}, whether it is SQuAD v2 (has impossible questions))."""
    if name.startswith("squad:"):
        folder = Path(name[len("squad:"):]).expanduser()
        splits = {split: read_json(folder / f"{split}.json") for split in ("train", "dev")}
    elif name in TFDS_NAMES:
        splits = {ours: _tfds_split(name, theirs, data_dir) for ours, theirs in _TFDS_SPLITS.items()}
    else:
        raise DataError(f"unknown question-answering task {name!r}; choose squad:DIR or one of "
                        f"{', '.join(TFDS_NAMES)}")
    v2 = name == "squad/v2.0" or any(q.impossible for qs in splits.values() for q in qs)
    return splits, v2


def read_json(path: Path) -> list[Question]:
    """The questions of one SQuAD-format file; any malformed entry is one DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; a squad:DIR folder holds train.json and dev.json "
                        f"in SQuAD's format")
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a SQuAD JSON file ({type(e).__name__}: {e}); it needs "
                        f'{{"data": [{{"paragraphs": [{{"context", "qas"}}]}}]}}') from None
    questions = []
    for a, article in enumerate(articles):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            context = paragraph.get("context")
            for k, qa in enumerate(paragraph.get("qas", [])):
                qid = str(qa.get("id", f"data[{a}].paragraphs[{p}].qas[{k}]"))
                questions.append(_question(qa, qid, context, path))
    if not questions:
        raise DataError(f"{path} holds no questions")
    return questions


def _question(qa: dict, qid: str, context, where) -> Question:
    if not isinstance(context, str) or not isinstance(qa.get("question"), str):
        raise DataError(f"{where}: question {qid} lacks its question or context text")
    answers = [] if qa.get("is_impossible") else qa.get("answers", [])
    texts, starts = [], []
    for answer in answers:
        text, start = answer.get("text"), answer.get("answer_start")
        if not isinstance(text, str) or not isinstance(start, int) or not text:
            raise DataError(f"{where}: question {qid} has an answer without a text and an integer "
                            f"answer_start")
        if context[start:start + len(text)] != text:
            raise DataError(f"{where}: question {qid}: answer {text!r} is not at answer_start="
                            f"{start} of its context (found {context[start:start + len(text)]!r}); "
                            f"fix answer_start to the answer's character offset")
        texts.append(text)
        starts.append(start)
    if not texts and not qa.get("is_impossible"):
        raise DataError(f"{where}: question {qid} has no answers and is not marked is_impossible")
    return Question(qid, qa["question"], context, tuple(texts), tuple(starts))


def _tfds_split(name: str, split: str, data_dir: Path) -> list[Question]:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.question_answering import squad as _  # noqa: F401  registers it

    from data.tasks import tfds_missing
    try:
        source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
    except Exception as e:  # noqa: BLE001  tfds raises several types; each means "not readable"
        raise DataError(tfds_missing(name, data_dir, e)) from None
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
    questions = []
    for i in range(len(source)):
        r = source[i]
        qa = {"id": text(r["id"]), "question": text(r["question"]),
              "is_impossible": bool(r.get("is_impossible", False)),
              "answers": [{"text": text(t), "answer_start": int(s)} for t, s in
                          zip(r["answers"]["text"], r["answers"]["answer_start"])]}
        questions.append(_question(qa, qa["id"], text(r["context"]), f"{name} {split}"))
    return questions


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------

def window_starts(n_tokens: int, room: int, stride: int) -> list[int]:
    """Where each window of at most `room` context tokens starts: every `stride` tokens until one
    reaches the end (BERT's run_squad: the step is min(window length, stride))."""
    starts, start = [], 0
    while True:
        starts.append(start)
        if start + room >= n_tokens:
            return starts
        start += min(room, stride)


def token_span(offsets: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """The first and last context token that overlap characters [start, end)."""
    inside = np.nonzero((offsets[:, 1] > start) & (offsets[:, 0] < end))[0]
    return (int(inside[0]), int(inside[-1])) if len(inside) else (-1, -1)


class Windows:
    """One split as windows: `len()` windows, `labels` (W, 2) start/end positions, `index` the
    question each window belongs to; `encode(rows)` gives their padded model inputs."""

    def __init__(self, questions: list[Question], tokenizer, max_seq_len: int, doc_stride: int,
                 max_query_len: int):
        self.questions = questions
        self.max_seq_len = max_seq_len
        q_ids = [ids[:max_query_len] for ids in tokenizer.encode_batch([q.question for q in questions])]
        contexts = sorted({q.context for q in questions})
        encoded = dict(zip(contexts, tokenizer.encode_with_offsets(contexts)))
        self.pad_id, self.cls_id, self.sep_id = tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id
        self.question_ids, self.context_ids, self.offsets = [], [], []
        rows = []  # (question, first context token, number of context tokens, label start, end)
        for i, q in enumerate(questions):
            ids, offsets = encoded[q.context]
            self.question_ids.append(q_ids[i])
            self.context_ids.append(ids)
            self.offsets.append(offsets)
            room = max_seq_len - len(q_ids[i]) - 3
            if room < 1:
                raise DataError(f"data.max_seq_len={max_seq_len} leaves no room for the context "
                                f"after a {len(q_ids[i])}-token question; raise it or lower "
                                f"data.max_query_len")
            first, last = (token_span(offsets, q.starts[0], q.starts[0] + len(q.answers[0]))
                           if q.answers else (-1, -1))
            for s in window_starts(len(ids), room, doc_stride):
                n = min(room, len(ids) - s)
                at = 2 + len(q_ids[i]) - s  # sequence position of context token 0 in this window
                inside = first >= s and last >= 0 and last < s + n
                rows.append((i, s, n, first + at if inside else 0, last + at if inside else 0))
        table = np.array(rows, np.int64).reshape(-1, 5)
        self.index, self.start, self.length = table[:, 0], table[:, 1], table[:, 2]
        self.labels = table[:, 3:5].copy()
        self.labelled = True

    def __len__(self) -> int:
        return len(self.index)

    def context_at(self, w: int) -> int:
        """The sequence position of window w's first context token."""
        return 2 + len(self.question_ids[self.index[w]])

    def encode(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        n, t = len(rows), self.max_seq_len
        input_ids = np.full((n, t), self.pad_id, np.int32)
        types, mask = np.zeros((n, t), np.int32), np.zeros((n, t), np.int32)
        for r, w in enumerate(rows):
            q = self.index[w]
            ctx = self.context_ids[q][self.start[w]:self.start[w] + self.length[w]]
            ids = [self.cls_id, *self.question_ids[q], self.sep_id, *ctx, self.sep_id]
            input_ids[r, :len(ids)] = ids
            types[r, len(self.question_ids[q]) + 2:len(ids)] = 1
            mask[r, :len(ids)] = 1
        return {"input_ids": input_ids, "token_type_ids": types, "attention_mask": mask,
                "labels": self.labels[rows].astype(np.int32)}
