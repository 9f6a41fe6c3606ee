"""`python -m models.hf export` on a real pretraining workdir: transformers gives our logits."""


import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from models import hf, hf_cli
from models.bert import BertConfig, BertForPreTraining
from models.layers import in_layout, is_stacked
from models.tokenizer import Tokenizer
from pretrain.__main__ import main as pretrain
from conftest import tiny_flags
from training import run_record
from training.checkpoint_reader import read_params
from training.state import abstract_model


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def pretrained(request, tmp_path_factory, data_dir):
    """A workdir of 3 steps; `scanned`: its checkpoint holds the stacked layout."""
    workdir = tmp_path_factory.mktemp("pretrained")
    pretrain(["--workdir", str(workdir),
              *tiny_flags(data_dir, train__steps=3, model__scan_layers=request.param)])
    return workdir


def test_exported_pretraining_checkpoint_matches_ours(pretrained, tmp_path):
    out = tmp_path / "hf"
    hf_cli.main(["export", "--checkpoint", str(pretrained), "--out", str(out)])
    config = run_record.read(pretrained)[0]
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

    # Import gives per-layer weights whatever the checkpoint's layout; in that layout, ours again.
    imported, _, _ = hf.import_params(out)
    assert is_stacked(params) == cfg.scan_layers
    again = in_layout(imported, scanned=cfg.scan_layers)
    flat = lambda tree: {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
                         for p, x in jax.tree_util.tree_leaves_with_path(tree)}  # 0 and '0' alike
    ours = flat({k: v for k, v in params.items() if k in again})
    assert flat(again).keys() == ours.keys()
    for name, x in flat(again).items():
        np.testing.assert_array_equal(x, ours[name])
