"""ModernBERT against transformers' own ModernBert classes (5.25), CPU, float32, small models.

Rows are longer than the local window (the release's 128 tokens) and padded, so global and
sliding-window layers, rotary bases and padding all count."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import perturbed_params
from models import hf
from models.layers import stack_layers
from models.modernbert import (ModernBertConfig, ModernBertForMaskedLM,
                               ModernBertForSequenceClassification)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, T, TOL = 320, 150, 1e-5
LENGTHS = (150, 131, 70, 5)  # full, past the window, inside it, tiny


def hf_config(**overrides):
    """A small ModernBertConfig with the release's attention pattern, window and rotary bases,
    and special ids inside our vocabulary."""
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, max_position_embeddings=512, pad_token_id=0,
              cls_token_id=2, bos_token_id=2, sep_token_id=3, eos_token_id=3)
    return transformers.ModernBertConfig(**(kw | overrides))


def hf_made(cls=None, seed=0, **overrides):
    """A transformers model with every weight random (norm scales and the decoder bias too, so
    that a weight in the wrong place shows) and query/key weights large enough that attention
    is far from uniform, so positions (rotary, window) change the logits."""
    torch.manual_seed(seed)
    model = (cls or transformers.ModernBertForMaskedLM)(hf_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("Wqkv.weight"):
                p.copy_(0.2 * torch.randn_like(p))
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def inputs(seed=0, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(4, VOCAB, (len(lengths), T)), 0)
    ids[:, 0] = 2
    return ids, mask


def run_hf(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def build(cls, cfg, params, *args):
    with nnx.use_eager_sharding(False):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: cls(cfg, *args, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def random_params(cls, cfg, *args, seed=0):
    """Our model's init with norm scales and biases moved off 1 and 0."""
    with nnx.use_eager_sharding(False):
        return perturbed_params(cls(cfg, *args, rngs=nnx.Rngs(seed)), seed)


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


def load_hf(auto_class, folder):
    model, info = auto_class.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


OURS = ModernBertConfig(vocab_size=VOCAB, num_layers=4, hidden_size=64, num_heads=4,
                        intermediate_size=96, max_position=512)


# ---------------------------------------------------------------------------------------------
# A folder saved by transformers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = hf_made()
    folder = tmp_path_factory.mktemp("mb") / "hf"
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("scan", [False, True])
def test_transformers_folder_imports_with_the_same_logits(saved, scan):
    model, folder = saved
    params, cfg, architecture = hf.import_params(folder)
    assert architecture == "ModernBertForMaskedLM" and cfg == OURS
    ids, mask = inputs()
    want = run_hf(model, ids, mask)
    if scan:  # layer 0, then one scanned group (global, local, local)
        cfg, params = dataclasses.replace(cfg, scan_layers=True), stack_layers(params, head=1, group=3)
    ours = build(ModernBertForMaskedLM, cfg, params)
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    diff = np.abs(got - want)[mask == 1].max()
    # Only at some positions (HF's sparse_prediction): the same rows of the same logits.
    positions = np.array([[0, 5, 140], [1, 64, 130], [3, 40, 69], [0, 1, 4]])
    sparse = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)))
    sparse_diff = np.abs(sparse - np.take_along_axis(want, positions[..., None], 1)).max()
    print(f"\n[scan={scan}] MaskedLM logits max |diff| {diff:.3g}, at masked positions {sparse_diff:.3g}")
    assert diff < TOL and sparse_diff < TOL


def test_the_window_and_rotary_bases_matter(saved):
    """Negative controls: the same weights with a wider window, or the global base in every
    layer, give other logits on these rows, so the parity above tests them."""
    model, folder = saved
    params, cfg, _ = hf.import_params(folder)
    ids, mask = inputs()
    want = run_hf(model, ids, mask)
    for wrong in (dict(local_window=256), dict(local_rope_base=160_000.0)):
        got = np.asarray(build(ModernBertForMaskedLM, dataclasses.replace(cfg, **wrong), params)(
            jnp.asarray(ids), jnp.asarray(mask)))
        assert np.abs(got - want)[mask == 1].max() > 10 * TOL, wrong


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    params = random_params(ModernBertForMaskedLM, OURS, seed=1)
    folder = tmp_path_factory.mktemp("mb_export") / "hf"
    hf.export_params(params, OURS, folder, architecture="ModernBertForMaskedLM")
    return params, folder


def test_export_loads_in_transformers_with_the_same_logits(exported):
    params, folder = exported
    model = load_hf(transformers.AutoModelForMaskedLM, folder)
    assert type(model).__name__ == "ModernBertForMaskedLM"
    assert model.decoder.weight.data_ptr() == model.model.embeddings.tok_embeddings.weight.data_ptr()
    config = json.loads((folder / "config.json").read_text())
    assert (config["pad_token_id"], config["cls_token_id"], config["sep_token_id"]) == (0, 2, 3)
    assert config["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention",
                                     "full_attention"]
    ids, mask = inputs(seed=1)
    got = np.asarray(build(ModernBertForMaskedLM, OURS, params)(jnp.asarray(ids), jnp.asarray(mask)))
    diff = np.abs(got - run_hf(model, ids, mask))[mask == 1].max()
    print(f"\n[export] MaskedLM logits max |diff| {diff:.3g}")
    assert diff < TOL


def test_round_trip_is_bitwise(exported, tmp_path):
    params, folder = exported
    back, cfg, _ = hf.import_params(folder)
    assert cfg == OURS
    assert_same_tree(params, back)
    # A scanned model's weights export to the same files and come back per layer.
    hf.export_params(stack_layers(params, head=1, group=3), OURS, tmp_path / "scanned",
                     architecture="ModernBertForMaskedLM")
    assert_same_tree(params, hf.import_params(tmp_path / "scanned")[0])


def test_classifier_parity(tmp_path):
    params = random_params(ModernBertForSequenceClassification, OURS, 3, seed=2)
    hf.export_params(params, OURS, tmp_path / "clf", architecture="ModernBertForSequenceClassification",
                     id2label=["a", "b", "c"])
    model = load_hf(transformers.AutoModelForSequenceClassification, tmp_path / "clf")
    ids, mask = inputs(seed=2)
    got = np.asarray(build(ModernBertForSequenceClassification, OURS, params, 3)(
        jnp.asarray(ids), jnp.asarray(mask)))
    diff = np.abs(got - run_hf(model, ids, mask)).max()
    print(f"\n[classifier] logits max |diff| {diff:.3g}")
    assert diff < TOL
    assert_same_tree(params, hf.import_params(tmp_path / "clf")[0])


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------


def test_release_style_config_reads():
    """The released checkpoints' config.json: no layer_types, the older rope keys."""
    config = {"model_type": "modernbert", "vocab_size": 50368, "hidden_size": 768,
              "intermediate_size": 1152, "num_hidden_layers": 22, "num_attention_heads": 12,
              "global_attn_every_n_layers": 3, "global_rope_theta": 160000.0,
              "local_rope_theta": 10000.0, "local_attention": 128, "norm_eps": 1e-5,
              "norm_bias": False, "pad_token_id": 50283, "cls_token_id": 50281,
              "sep_token_id": 50282, "hidden_activation": "gelu"}
    cfg = hf.config_from_hf(config)
    assert cfg == ModernBertConfig.of_size("base", 50368, pad_token_id=50283, cls_token_id=50281,
                                           sep_token_id=50282)
    assert hf.config_from_hf(hf.hf_config(cfg, "ModernBertForMaskedLM")) == cfg


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("change, message", [
    ({"local_attention": 127}, "local_window 127 must be a positive even number"),
    ({"norm_bias": True}, "norm_bias=True"),
    ({"layer_types": ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]},
     "not full attention every n-th layer"),
    ({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0},
                          "sliding_attention": {"rope_type": "default"}}}, "rope_type='linear'"),
])
def test_refuses_what_our_model_cannot_run(change, message):
    config = hf.hf_config(OURS, "ModernBertForMaskedLM") | change
    with pytest.raises(hf.ConversionError) as e:
        hf.config_from_hf(config)
    assert message in one_line(e)


def test_another_architecture_is_one_line(tmp_path):
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64))
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(hf.ConversionError) as e:
        hf.import_params(tmp_path / "bert", architecture="ModernBertForMaskedLM")
    assert "holds a bert model, not a ModernBertForMaskedLM" in one_line(e)


def test_transformers_folder_into_a_fresh_scanned_model(saved):
    """What --init does with a transformers folder: its weights taken into a fresh model of the
    other layout (scanned: layer 0, then a group) give transformers' logits."""
    from training.init_source import take_params
    from training.state import init_params
    model, folder = saved
    cfg = dataclasses.replace(OURS, scan_layers=True)
    fresh = init_params(lambda rngs: ModernBertForMaskedLM(cfg, rngs), seed=0)
    taken, kept = take_params(hf.import_params(folder)[0], fresh, str(folder))
    assert kept == []
    ids, mask = inputs(seed=3)
    got = np.asarray(build(ModernBertForMaskedLM, cfg, taken)(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(got - run_hf(model, ids, mask))[mask == 1].max() < TOL


def test_export_run_reads_the_family_from_the_run_config(exported, tmp_path):
    """A pretraining run's config.json (`family`, the `model` group) is all export needs."""
    params, folder = exported
    run = {"family": "modernbert", "model": {"size": "", **dataclasses.asdict(OURS)}}
    out, architecture = hf.export_run(params, run, tmp_path / "run_export")
    assert architecture == "ModernBertForMaskedLM"
    assert json.loads((out / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    with pytest.raises(hf.ConversionError) as e:
        hf.export_run(params, {"family": "modernbert", "model": {"size": "tiny", "vocab_size": VOCAB,
                                                                  "local_windw": 64}}, tmp_path / "x")
    assert "unknown key(s) 'local_windw'" in one_line(e) and not (tmp_path / "x").exists()
