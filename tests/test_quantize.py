"""int8 weight quantisation through qwix (models/quantize.py, finetune/quantize.py): scales by
hand, logits against float's, qwix's own int8 paths against our dequantised weights,
straight-through gradients, the export that transformers loads, and one-line errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from conftest import cli_error
from finetune.bert import SequenceClassifier
from models import quantize
from models.bert import BertConfig
from training.state import abstract_model

CFG = BertConfig(vocab_size=64, num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64,
                 max_position=16, dropout=0.0, attention_dropout=0.0)
CLASSES = 3


def classifier(rngs):
    return SequenceClassifier(CFG, CLASSES, 0.0, rngs)


def inputs(seed=0, batch=4, seq=8):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (batch, seq)), jnp.int32)
    return ids, jnp.zeros_like(ids), jnp.ones_like(ids)


@pytest.fixture(scope="module")
def trained():
    """A classifier whose weights are far from init (scaled so that rounding shows in logits),
    its params and their int8 version."""
    with nnx.use_eager_sharding(False):
        model = classifier(nnx.Rngs(0))
    params = jax.tree.map(lambda p: p * 3.0, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    channels = quantize.weight_channels(abstract_model(classifier))
    quantised = quantize.quantize_params(params, channels, "int8")
    return params, channels, quantised


def with_params(model_fn, params):
    return nnx.merge(nnx.graphdef(abstract_model(model_fn)), params)


def test_per_channel_scales_by_hand_and_the_rounding_bound():
    w = np.array([[0.5, -1.0, 0.25], [0.01, 0.002, -0.004]], np.float32)  # rows: output channels
    q, scale, dequantised = quantize.quantize_rows(w, "int8")
    golden = np.array([[1.0 / 127.5], [0.01 / 127.5]], np.float32)  # qwix: max|w| / (127 + 0.5)
    np.testing.assert_allclose(scale, golden, rtol=1e-6)
    assert q.dtype == np.int8 and np.array_equal(q, np.clip(np.round(w / golden), -128, 127))
    np.testing.assert_array_equal(dequantised, q.astype(np.float32) * scale)
    assert np.all(np.abs(dequantised - w) <= golden / 2 + 1e-9)
    # Negative control: one scale for the whole tensor loses the small row's values.
    per_tensor = np.round(w / golden.max()) * golden.max()
    assert np.abs(per_tensor[1] - w[1]).max() > golden[1, 0] / 2


def test_channel_axes_of_our_layers(trained):
    params, channels, quantised = trained
    kernels = {k[-2]: v for k, v in channels.items() if k[1:3] == ("layers", "0")}  # layer 0's
    assert kernels["query"] == ((1, 2), 3) and kernels["attn_out"] == ((2,), 3), kernels  # DNH, NHD
    for path, q in quantised.items():
        w = np.asarray(_at(params, path))
        axes, _ = channels[path]
        reduce = tuple(a for a in range(w.ndim) if a not in axes)
        golden = np.abs(w).max(axis=reduce, keepdims=True) / 127.5
        np.testing.assert_allclose(np.asarray(q.scale), golden, rtol=1e-6, err_msg=str(path))
        assert np.all(np.abs(np.asarray(qwix.dequantize(q)) - w) <= golden / 2 + 1e-7)
    names = {p[-1] for p in quantised}
    assert names == {"kernel", "embedding"}, names
    assert len(quantised) == 3 + 2 * 6 + 2, sorted(quantised)  # embeddings, 6 per layer, pooler, head


def _at(tree, path):
    for k in path:
        tree = tree[k] if k in tree else tree[int(k)]
    return tree


def test_int8_logits_close_to_float_and_qwix_int8_paths_agree(trained):
    params, channels, quantised = trained
    x = inputs()
    deq = quantize.dequantize(params, quantised)
    float_logits = with_params(classifier, params)(*x)
    int8_logits = with_params(classifier, deq)(*x)
    gap = float(jnp.abs(int8_logits - float_logits).max())
    assert 0 < gap < 0.05 * float(jnp.abs(float_logits).max()), gap  # close, yet not float

    # qwix's quantisation-aware forward fake-quantises the dense kernels as we quantise them
    # (embeddings stay float there: a gather is not intercepted).
    dense_only = quantize.dequantize(params, {p: q for p, q in quantised.items() if p[-1] == "kernel"})
    qat = with_params(lambda r: quantize.qat_model(classifier(r), "int8"), params)
    np.testing.assert_allclose(qat(*x), with_params(classifier, dense_only)(*x), atol=1e-5)
    assert float(jnp.abs(qat(*x) - float_logits).max()) > 1e-4  # the interception is active

    # qwix's post-training path: int8 kernels (QArrays) in the model, matmuls on them.
    model = with_params(classifier, params)
    quantize.use_lax_dot_general(model)
    rules = [qwix.QuantizationRule(module_path=".*", op_names=("dot_general",), weight_qtype=jnp.int8)]
    ptq = qwix.quantize_model(model, qwix.PtqProvider(rules), *x)
    np.testing.assert_allclose(ptq(*x), with_params(classifier, dense_only)(*x), atol=1e-5)


@pytest.mark.slow  # whole runs or a long compile: the default pytest stays under 15 minutes
def test_qat_gradients_flow_straight_through(trained):
    params, channels, quantised = trained
    x, labels = inputs(), jnp.array([0, 1, 2, 1])
    dense_only = quantize.dequantize(params, {p: q for p, q in quantised.items() if p[-1] == "kernel"})

    def loss(model_fn, p):
        logits = with_params(model_fn, p)(*x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    qat_fn = lambda r: quantize.qat_model(classifier(r), "int8")
    g_qat = jax.jit(jax.grad(lambda p: loss(qat_fn, p)))(params)
    # Straight-through: d loss(Q(W)) / dW is the float gradient taken at Q(W).
    g_ste = jax.grad(lambda p: loss(classifier, p))(dense_only)
    g_float = jax.grad(lambda p: loss(classifier, p))(params)  # negative control: at W, not Q(W)
    kernels = [path for path in quantised if path[-1] == "kernel"]
    for path in kernels:
        assert np.abs(np.asarray(_at(g_qat, path))).max() > 0, path
    gap = lambda g: max(float(np.abs(np.asarray(_at(g_qat, p)) - np.asarray(_at(g, p))).max()) for p in kernels)
    assert gap(g_ste) < 1e-6 and gap(g_float) > 20 * gap(g_ste), (gap(g_ste), gap(g_float))


def test_bytes_count_integers_and_scales(trained):
    params, channels, quantised = trained
    full, small = quantize.model_bytes(params), quantize.model_bytes(params, quantised)
    assert full == 4 * sum(x.size for x in jax.tree.leaves(params))
    expected = 0
    for path in [tuple(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]:
        w = np.asarray(_at(params, path))
        if path in quantised:  # a byte per weight, a float32 scale per output channel
            expected += w.size + 4 * int(np.prod([w.shape[a] for a in channels[path][0]]))
        else:
            expected += 4 * w.size
    assert small == expected and small < 0.4 * full  # (0.26 at bert_tiny's width, see RESULTS)


def test_unknown_quantisation_type_is_one_line_and_writes_nothing(capsys, tmp_path):
    from finetune.__main__ import main as finetune_main
    from models.hf_cli import main as hf_main
    out = tmp_path / "q"
    line = cli_error(capsys, hf_main, ["quantize", "--checkpoint", str(tmp_path / "none"),
                                       "--out", str(out), "--qtype", "int3"])
    assert "unknown quantisation type 'int3'" in line and "int8" in line
    workdir = tmp_path / "ft"
    line = cli_error(capsys, finetune_main, ["--config", "configs/finetune_reuters_r8.py", "--init", "none",
                                             "--workdir", str(workdir), "--config.method.quantize=int3"])
    assert "unknown quantisation type 'int3' for method.quantize" in line and "int8" in line
    assert not out.exists() and not workdir.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_finetune_int8_results_and_quantized_export_load_in_transformers(data_dir, tmp_path):
    import torch
    import transformers
    from safetensors.numpy import load_file
    from configs import finetune_rt_polarity
    from conftest import TINY_FT, with_fields
    from data.tasks import Split, encode
    from finetune.quantize import post_training
    from finetune.train import train_and_evaluate
    from models import hf_cli
    from models.tokenizer import Tokenizer
    from training.checkpoint_reader import read_params

    config = with_fields(finetune_rt_polarity.get_config(),
                         {**TINY_FT, "data.data_dir": str(data_dir), "method.quantize_after": "int8"})
    results = train_and_evaluate(config, tmp_path / "ft", "none")
    record = results["quantized"]
    assert record["dtype"] == "int8" and 0.25 < record["bytes"] / record["float32_bytes"] < 0.3
    assert set(record["test"]) == set(results["test"])

    out = tmp_path / "hf"
    hf_cli.main(["quantize", "--checkpoint", str(tmp_path / "ft" / "best"), "--out", str(out)])
    summary = json.loads((out / "quantization.json").read_text())
    assert summary["dtype"] == "int8" and 0.25 < summary["ratio"] < 0.3
    floats, ints = load_file(out / "model.safetensors"), load_file(out / "model.int8.safetensors")
    quantised = [k for k in floats if f"{k}.scale" in ints]
    assert "bert.embeddings.word_embeddings.weight" in quantised and "classifier.weight" in quantised
    for name in floats:
        if name in quantised:
            assert ints[name].dtype == np.int8
            np.testing.assert_array_equal(floats[name], ints[name] * ints[f"{name}.scale"])
        else:
            np.testing.assert_array_equal(floats[name], ints[name])

    # transformers on the dequantised export = our model on our int8 weights
    model_fn = lambda r: SequenceClassifier(BertConfig(**results["encoder"]), 2, 0.1, r)
    params = read_params(tmp_path / "ft" / "best")[0]
    deq, _ = post_training(abstract_model(model_fn), params, "int8")
    texts = ["A three-hour cinema master class.", "So muddled, repetitive and ragged."]
    batch = encode(Split(texts, None, np.zeros(2), np.arange(2)), Tokenizer.load(tmp_path / "ft" / "tokenizer"), 32)
    keys = ("input_ids", "token_type_ids", "attention_mask")
    ours = np.asarray(with_params(model_fn, deq)(*(batch[k] for k in keys)))
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        logits = theirs(**{k: torch.tensor(batch[k]).long() for k in keys}).logits.numpy()
    np.testing.assert_allclose(logits, ours, atol=1e-5)
    floating = np.asarray(with_params(model_fn, params)(*(batch[k] for k in keys)))
    assert np.abs(floating - ours).max() > 1e-6  # the export is not the float model
