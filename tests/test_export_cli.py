"""`python -m models.hf export` on a real pretraining workdir: transformers gives our logits."""

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from models import hf
from models.bert import BertConfig, BertForPreTraining
from models.tokenizer import Tokenizer
from pretrain.__main__ import main as pretrain
from conftest import tiny_flags
from training.checkpoint import read_params
from training.state import abstract_model


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("pretrained")
    pretrain(["--workdir", str(workdir), *tiny_flags(data_dir, train__steps=3)])
    return workdir


def test_exported_pretraining_checkpoint_matches_ours(pretrained, tmp_path):
    out = tmp_path / "hf"
    hf.main(["export", "--checkpoint", str(pretrained), "--out", str(out)])
    config = json.loads((pretrained / "config.json").read_text())
    cfg = BertConfig.from_model_config(config["model"])
    params, step = read_params(pretrained)
    assert step == 3
    model = nnx.merge(nnx.graphdef(abstract_model(lambda r: BertForPreTraining(cfg, r))), params)

    tokenizer = Tokenizer.load(pretrained / "tokenizer")
    theirs = transformers.AutoModelForPreTraining.from_pretrained(out).eval()
    auto_tok = transformers.AutoTokenizer.from_pretrained(out)
    pairs = [("The dictionary is a mapping type.", "Keys must be hashable."),
             ("Naïve café: lambda expressions!", "中文 unknownwordzzz")]
    enc = auto_tok([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="np")
    for (a, b), ids in zip(pairs, enc["input_ids"]):
        ours_ids, _ = tokenizer.encode_pair(a, b, max_len=64)
        assert list(ids[: len(ours_ids)]) == ours_ids
    with torch.no_grad():
        out_t = theirs(**{k: torch.from_numpy(v).long() for k, v in enc.items()})
    mlm, nsp = model(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
    real = enc["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(mlm)[real], out_t.prediction_logits.numpy()[real], atol=1e-5)
    np.testing.assert_allclose(np.asarray(nsp), out_t.seq_relationship_logits.numpy(), atol=1e-5)
