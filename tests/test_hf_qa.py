"""Question-answering heads against transformers' BertForQuestionAnswering and
ModernBertForQuestionAnswering, float32, both ways: our export loads in transformers with the
same start/end logits, and a model transformers made imports into ours with the same logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from finetune.bert import PositionClassifier
from models import hf
from models.modernbert import ModernBertForPositionClassification
from tests import test_hf as b
from tests import test_hf_modernbert as m

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
# ModernBertForQuestionAnswering: the per-position class with two outputs named as HF's QA head
MODERNBERT_QA = functools.partial(ModernBertForPositionClassification, output="qa_outputs")


def hf_logits(model, **inputs) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.tensor(v) for k, v in inputs.items()})
    return np.stack([out.start_logits.numpy(), out.end_logits.numpy()], -1)


def bert_qa(cfg, params):
    with nnx.use_eager_sharding(False):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: PositionClassifier(cfg, 2, 0.0, nnx.Rngs(0), output="qa_outputs")))
    return b.build(graphdef, params)


# ~40 s each on the loaded 2-core machine (transformers builds and saves two models each).
@pytest.mark.slow
def test_bert_export_and_import(tmp_path):
    _, pretrained, cfg = b.random_model("tiny", seed=3)
    rng = np.random.default_rng(3)
    params = {"encoder": pretrained["encoder"],
              "qa_outputs": {"kernel": rng.normal(0, 0.5, (cfg.hidden_size, 2)).astype(np.float32),
                             "bias": rng.normal(0, 0.5, (2,)).astype(np.float32)}}
    assert hf.infer_architecture(params) == "BertForQuestionAnswering"
    folder = hf.export_params(params, cfg, tmp_path / "qa", architecture="BertForQuestionAnswering")
    model = b.load_hf(transformers.AutoModelForQuestionAnswering, folder)
    assert type(model).__name__ == "BertForQuestionAnswering" and model.bert.pooler is None
    ids, types, mask = b.random_inputs(cfg.vocab_size, seed=3)
    ours = np.asarray(bert_qa(cfg, params)(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask)))
    diff = np.abs(ours - hf_logits(model, input_ids=ids, token_type_ids=types, attention_mask=mask)).max()
    print(f"\n[BertForQuestionAnswering export] start/end logits max |diff| {diff:.3g}")
    assert ours.shape == (*ids.shape, 2) and diff < TOL

    # Import: transformers' own model, its weights perturbed so a misplaced tensor shows.
    torch.manual_seed(4)
    theirs = transformers.BertForQuestionAnswering(model.config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "theirs")
    back, back_cfg, architecture = hf.import_params(tmp_path / "theirs")
    assert architecture == "BertForQuestionAnswering" and "pooler" not in back["encoder"]
    back["encoder"]["pooler"] = params["encoder"]["pooler"]  # ours keeps one, unused by the head
    got = np.asarray(bert_qa(back_cfg, back)(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask)))
    want = hf_logits(theirs, input_ids=ids, token_type_ids=types, attention_mask=mask)
    diff = np.abs(got - want).max()
    print(f"[BertForQuestionAnswering import] start/end logits max |diff| {diff:.3g}")
    assert diff < TOL and np.abs(got - ours).max() > 1e-2  # negative control: other weights differ

    # Round trip: what we wrote reads back bitwise, without the pooler the class has not.
    again, _, _ = hf.import_params(folder)
    expect = {**params, "encoder": {k: v for k, v in params["encoder"].items() if k != "pooler"}}
    m.assert_same_tree(jax.tree.map(np.asarray, expect), again)


@pytest.mark.slow
def test_modernbert_export_and_import(tmp_path):
    params = m.random_params(MODERNBERT_QA, m.OURS, 2, seed=5)
    assert hf.infer_architecture(params, "modernbert") == "ModernBertForQuestionAnswering"
    hf.export_params(params, m.OURS, tmp_path / "qa", architecture="ModernBertForQuestionAnswering")
    model = m.load_hf(transformers.AutoModelForQuestionAnswering, tmp_path / "qa")
    assert type(model).__name__ == "ModernBertForQuestionAnswering"
    ids, mask = m.inputs(seed=5)
    ours = np.asarray(m.build(MODERNBERT_QA, m.OURS, params, 2)(
        jnp.asarray(ids), jnp.asarray(mask)))
    real = mask == 1  # transformers leaves padding positions' states undefined (it unpads)
    diff = np.abs(ours - hf_logits(model, input_ids=ids, attention_mask=mask))[real].max()
    print(f"\n[ModernBertForQuestionAnswering export] start/end logits max |diff| {diff:.3g}")
    assert diff < TOL
    m.assert_same_tree(params, hf.import_params(tmp_path / "qa")[0])

    theirs = m.hf_made(transformers.ModernBertForQuestionAnswering, seed=6)
    theirs.save_pretrained(tmp_path / "theirs")
    back, back_cfg, architecture = hf.import_params(tmp_path / "theirs")
    assert architecture == "ModernBertForQuestionAnswering"
    got = np.asarray(m.build(MODERNBERT_QA, back_cfg, back, 2)(
        jnp.asarray(ids), jnp.asarray(mask)))
    diff = np.abs(got - hf_logits(theirs, input_ids=ids, attention_mask=mask))[real].max()
    print(f"[ModernBertForQuestionAnswering import] start/end logits max |diff| {diff:.3g}")
    assert diff < TOL and np.abs(got - ours).max() > 1e-2
