"""HuggingFace export/import (models/hf.py) against real transformers + torch models, CPU, small."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `pytest` from anywhere

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from models import hf, hf_cli
from models.bert import BertConfig, BertForPreTraining

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB, MAX_POS = 512, 64
TOL = 1e-5
LABELS = ["negative", "neutral", "positive"]


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


def random_model(size: str, seed: int = 0):
    """(graphdef, params, cfg) with LayerNorm, biases and the MLM bias perturbed away from 0/1."""
    cfg = BertConfig.of_size(size, VOCAB, max_position=MAX_POS)
    with nnx.use_eager_sharding(False):
        model = BertForPreTraining(cfg, nnx.Rngs(seed))
    graphdef, state = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(seed + 100)

    def perturb(path, x):
        name = str(path[-1].key)
        if name in ("bias", "scale", "mlm_bias"):
            return x + rng.normal(0, 0.3 if name == "mlm_bias" else 0.1, x.shape).astype(np.float32)
        return x

    params = jax.tree_util.tree_map_with_path(perturb, nnx.to_pure_dict(state))
    return graphdef, params, cfg


def build(graphdef, params):
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def random_inputs(vocab: int, seed: int = 0, batch: int = 4, length: int = 24):
    """Ids, mixed token types and padding at the end of some rows (lengths 24, 17, 9, 3)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length))
    types = (np.arange(length)[None] >= rng.integers(2, length - 2, (batch, 1))).astype(np.int64)
    lengths = np.array([length, 17, 9, 3])[:batch]
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)
    types = np.where(mask == 1, types, 0)
    return ids, types, mask


def ours(graphdef, params, ids, types, mask):
    mlm, nsp = build(graphdef, params)(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask))
    return np.asarray(mlm), np.asarray(nsp)


def load_hf(auto_class, folder, **kwargs):
    model, info = auto_class.from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def run_hf(model, ids, types, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                     attention_mask=torch.tensor(mask))


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


@pytest.fixture(scope="module", params=["tiny", "mini"])
def pretrained(request, tmp_path_factory):
    graphdef, params, cfg = random_model(request.param)
    folder = tmp_path_factory.mktemp(f"hf_{request.param}") / "export"
    hf.export_params(params, cfg, folder, architecture="BertForPreTraining")
    return request.param, graphdef, params, cfg, folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    graphdef, params, cfg = random_model("tiny", seed=1)
    folder = tmp_path_factory.mktemp("hf_tiny") / "export"
    hf.export_params(params, cfg, folder, architecture="BertForPreTraining")
    return graphdef, params, cfg, folder


def classifier_params(params, cfg, num_labels, seed=0):
    rng = np.random.default_rng(seed)
    return {"encoder": params["encoder"],
            "classifier": {"kernel": rng.normal(0, 0.5, (cfg.hidden_size, num_labels)).astype(np.float32),
                           "bias": rng.normal(0, 0.5, (num_labels,)).astype(np.float32)}}


# ---------------------------------------------------------------------------------------------
# 1. parity
# ---------------------------------------------------------------------------------------------


def test_pretraining_parity(pretrained):
    size, graphdef, params, cfg, folder = pretrained
    model = load_hf(transformers.AutoModelForPreTraining, folder)
    assert type(model).__name__ == "BertForPreTraining"
    decoder, words = model.cls.predictions.decoder.weight, model.bert.embeddings.word_embeddings.weight
    assert decoder.data_ptr() == words.data_ptr()  # tied, as transformers ties them
    ids, types, mask = random_inputs(cfg.vocab_size)
    mlm, nsp = ours(graphdef, params, ids, types, mask)
    out = run_hf(model, ids, types, mask)
    mlm_diff = np.abs(mlm - out.prediction_logits.numpy())[mask == 1].max()
    nsp_diff = np.abs(nsp - out.seq_relationship_logits.numpy()).max()
    print(f"\n[{size}] MLM logits max |diff| {mlm_diff:.3g}, NSP {nsp_diff:.3g}")
    assert mlm_diff < TOL and nsp_diff < TOL


def test_classifier_parity(tmp_path):
    graphdef, params, cfg = random_model("tiny", seed=2)
    cls_params = classifier_params(params, cfg, len(LABELS))
    folder = tmp_path / "cls"
    hf.export_params(cls_params, cfg, folder, architecture="BertForSequenceClassification", id2label=LABELS)
    model = load_hf(transformers.AutoModelForSequenceClassification, folder)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == dict(enumerate(LABELS)) and model.config.label2id["positive"] == 2

    ids, types, mask = random_inputs(cfg.vocab_size, seed=3)
    encoder = build(graphdef, params).encoder
    _, pooled = encoder(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask))
    logits = np.asarray(pooled) @ cls_params["classifier"]["kernel"] + cls_params["classifier"]["bias"]
    diff = np.abs(logits - run_hf(model, ids, types, mask).logits.numpy()).max()
    print(f"\n[tiny] classifier logits max |diff| {diff:.3g}")
    assert diff < TOL


def test_encoder_only_export(tiny, tmp_path):
    """BertModel from a pretraining tree: heads dropped, names without `bert.`."""
    graphdef, params, cfg, _ = tiny
    folder = hf.export_params(params, cfg, tmp_path / "enc", architecture="BertModel")
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        assert "embeddings.word_embeddings.weight" in f.keys()
        assert not any(k.startswith(("bert.", "cls.")) for k in f.keys())
    model = load_hf(transformers.AutoModel, folder)
    ids, types, mask = random_inputs(cfg.vocab_size, seed=4)
    hidden, pooled = build(graphdef, params).encoder(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask))
    out = run_hf(model, ids, types, mask)
    assert np.abs(np.asarray(hidden) - out.last_hidden_state.numpy())[mask == 1].max() < TOL
    assert np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max() < TOL


def test_config_json(tiny):
    _, _, cfg, folder = tiny
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForPreTraining"]
    assert config["hidden_act"] == "gelu" and config["layer_norm_eps"] == cfg.layer_norm_eps
    assert config["dtype"] == "float32" and config["max_position_embeddings"] == MAX_POS
    with pytest.raises(hf.ConversionError, match="id2label or num_labels"):
        hf.hf_config(cfg, "BertForSequenceClassification")


# ---------------------------------------------------------------------------------------------
# 2. round trips
# ---------------------------------------------------------------------------------------------


def test_round_trip_pretraining(pretrained):
    _, _, params, cfg, folder = pretrained
    back, back_cfg, architecture = hf.import_params(folder)
    assert architecture == "BertForPreTraining" and back_cfg == cfg
    assert_same_tree(params, back)


def test_round_trip_classifier_and_encoder(tiny, tmp_path):
    _, params, cfg, _ = tiny
    cls_params = classifier_params(params, cfg, 5)
    hf.export_params(cls_params, cfg, tmp_path / "cls", architecture="BertForSequenceClassification")
    back, _, architecture = hf.import_params(tmp_path / "cls")
    assert architecture == "BertForSequenceClassification"
    assert_same_tree(cls_params, back)
    hf.export_params(params, cfg, tmp_path / "enc", architecture="BertModel")
    back, _, architecture = hf.import_params(tmp_path / "enc")
    assert architecture == "BertModel"
    assert_same_tree({"encoder": params["encoder"]}, back)


def test_orbax_string_layer_keys(tiny, tmp_path):
    """Orbax restores layer 0 as '0': export takes that, import gives int keys back."""
    _, params, cfg, folder = tiny
    stringly = jax.tree.map(np.asarray, params)
    stringly["encoder"]["layers"] = {str(k): v for k, v in stringly["encoder"]["layers"].items()}
    hf.export_params(stringly, cfg, tmp_path / "s", architecture="BertForPreTraining")
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------
# 3. import of a model transformers made
# ---------------------------------------------------------------------------------------------


def hf_made_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=96,
                                     max_position_embeddings=MAX_POS, type_vocab_size=3)
    model = transformers.BertForPreTraining(config).eval()
    with torch.no_grad():  # transformers inits LayerNorm to 1/0 and biases to 0: move them
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_import_transformers_model(tmp_path):
    model = hf_made_model()
    model.save_pretrained(tmp_path / "pt")
    params, cfg, architecture = hf.import_params(tmp_path / "pt")
    assert architecture == "BertForPreTraining"
    sizes = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.type_vocab_size)
    assert sizes == (2, 64, 4, 96, 3)
    with nnx.use_eager_sharding(False):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: BertForPreTraining(cfg, nnx.Rngs(0))))
    ids, types, mask = random_inputs(cfg.vocab_size, seed=5)
    types = types * np.arange(types.shape[1])[None] % 3  # all three token types
    out = run_hf(model, ids, types, mask)
    with torch.no_grad():
        hidden_hf = model.bert(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                               attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    ours_model = build(graphdef, params)
    hidden, _ = ours_model.encoder(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask))
    mlm, nsp = ours_model(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask))
    diffs = {"hidden": np.abs(np.asarray(hidden) - hidden_hf)[mask == 1].max(),
             "mlm": np.abs(np.asarray(mlm) - out.prediction_logits.numpy())[mask == 1].max(),
             "nsp": np.abs(np.asarray(nsp) - out.seq_relationship_logits.numpy()).max()}
    print(f"\n[transformers-made] max |diff| " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    assert max(diffs.values()) < 1e-4

    # The same weights as a BertModel checkpoint (no `bert.` prefix), and only the encoder of
    # the pretraining checkpoint when asked for.
    model.bert.save_pretrained(tmp_path / "base")
    enc, _, architecture = hf.import_params(tmp_path / "base")
    assert architecture == "BertModel"
    assert_same_tree({"encoder": params["encoder"]}, enc)
    enc, _, _ = hf.import_params(tmp_path / "pt", architecture="BertModel")
    assert_same_tree({"encoder": params["encoder"]}, enc)
    # transformers' own sharded layout (index + shards) reads the same.
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert_same_tree(params, hf.import_params(tmp_path / "sharded")[0])


def test_import_legacy_names_and_tied_copy(tiny, tmp_path):
    """Old checkpoints: LayerNorm.gamma/beta and a stored copy of the tied decoder."""
    from safetensors.numpy import save_file
    _, params, _, folder = tiny
    src = tmp_path / "legacy"
    src.mkdir()
    (src / "config.json").write_text((folder / "config.json").read_text())
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        tensors = {k.replace("LayerNorm.weight", "LayerNorm.gamma")
                    .replace("LayerNorm.bias", "LayerNorm.beta"): f.get_tensor(k) for k in f.keys()}
    tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
    tensors["bert.embeddings.position_ids"] = np.arange(MAX_POS)[None]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    back, _, _ = hf.import_params(src)
    assert_same_tree(params, back)

    tensors["cls.predictions.decoder.weight"] = tensors["cls.predictions.decoder.weight"] + 1
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.ConversionError, match="cls.predictions.decoder.weight differs"):
        hf.import_params(src)


# ---------------------------------------------------------------------------------------------
# 4. tokenizer
# ---------------------------------------------------------------------------------------------

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "cafe", "naive", "hello", "world", "un", "##known", "##s", "##ing", "run", "mix",
         "##ed", "case", "Hello", "Café", "MiXeD", "don", "'", "t", "stop", "ever", ".", ",", "!",
         "?", "-", "—", "中", "文", "字", "é", "angstrom", "(", ")"]
TRICKY = ["Café naïve", "Hello, world!!", "unknownword xyzzy qq", "中文字 and 中文", "MiXeD CaSe runs",
          "don't stop—ever.", "  spaces\tand\nnewlines  ", "ÅNGSTRÖM (angstrom)", "", "[MASK] the [SEP]"]


def write_vocab(folder: Path) -> Path:
    letters = "abcdefghijklmnopqrstuvwxyzé"
    tokens = SPECIALS + WORDS + list(letters) + [f"##{c}" for c in letters]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in dict.fromkeys(tokens)), encoding="utf-8")
    return folder / "vocab.txt"


def reference_ids(vocab: Path, lowercase: bool, a, b=None):
    ref = tokenizers.BertWordPieceTokenizer(str(vocab), lowercase=lowercase)
    enc = ref.encode(a, b) if b is not None else ref.encode(a)
    return enc.ids, enc.type_ids


@pytest.mark.parametrize("lowercase", [True, False])
def test_tokenizer_from_vocab(tmp_path, lowercase):
    vocab = write_vocab(tmp_path / "src")
    out = hf.export_tokenizer(vocab, tmp_path / "tok", do_lower_case=lowercase, model_max_length=MAX_POS)
    assert {p.name for p in out.iterdir()} == set(hf.TOKENIZER_FILES)
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert type(tok).__name__ == "BertTokenizer" and tok.model_max_length == MAX_POS
    special_ids = (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id)
    assert special_ids == (0, 1, 2, 3, 4)
    for text in TRICKY:
        enc = tok(text)
        assert (enc["input_ids"], enc["token_type_ids"]) == reference_ids(vocab, lowercase, text), text
    enc = tok(TRICKY[0], TRICKY[5])
    assert (enc["input_ids"], enc["token_type_ids"]) == reference_ids(vocab, lowercase, TRICKY[0], TRICKY[5])
    # The tokenizer.json written beside it agrees too.
    from_json = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TRICKY:
        assert from_json.encode(text).ids == reference_ids(vocab, lowercase, text)[0], text


def test_tokenizer_from_tokenizer_json(tmp_path):
    """A folder as models.tokenizer writes it (vocab.txt + tokenizer.json), cased: the casing
    comes from tokenizer.json; asking for the other casing is refused."""
    src = tmp_path / "src"
    vocab = write_vocab(src)
    tokenizers.BertWordPieceTokenizer(str(vocab), lowercase=False).save(str(src / "tokenizer.json"))
    out = hf.export_tokenizer(src, tmp_path / "tok")
    assert json.loads((out / "tokenizer_config.json").read_text())["do_lower_case"] is False
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    for text in TRICKY:
        assert tok(text)["input_ids"] == reference_ids(vocab, False, text)[0], text
    with pytest.raises(hf.ConversionError, match="lowercases=False"):
        hf.export_tokenizer(src, tmp_path / "tok2", do_lower_case=True)


def test_export_with_tokenizer(tiny, tmp_path):
    _, params, cfg, _ = tiny
    vocab = write_vocab(tmp_path / "src")
    out = hf.export_params(params, cfg, tmp_path / "full", architecture="BertForPreTraining", tokenizer=vocab)
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.model_max_length == cfg.max_position
    model = load_hf(transformers.AutoModelForPreTraining, out)
    enc = tok(["Café naïve", "hello world"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).prediction_logits.shape == (2, enc["input_ids"].shape[1], cfg.vocab_size)


# ---------------------------------------------------------------------------------------------
# 5. errors
# ---------------------------------------------------------------------------------------------


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_refuses_pickles(tiny, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text((tiny[3] / "config.json").read_text())
    (src / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(hf.ConversionError) as e:
        hf.import_params(src)
    assert "pickle" in one_line(e) and "pytorch_model.bin" in one_line(e)


def test_shape_mismatch(tiny, tmp_path):
    _, params, cfg, folder = tiny
    src = tmp_path / "bad"
    src.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 600
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(hf.ConversionError) as e:
        hf.import_params(src)
    assert one_line(e) == ("tensor bert.embeddings.word_embeddings.weight has shape (512, 128) "
                           "but config.json implies (600, 128)")

    bad = jax.tree.map(lambda x: x, params)
    bad["encoder"]["layers"][1]["query"]["kernel"] = np.zeros((128, 4, 32), np.float32)
    with pytest.raises(hf.ConversionError) as e:
        hf.export_params(bad, cfg, tmp_path / "out", architecture="BertForPreTraining")
    assert "encoder/layers/1/query/kernel" in one_line(e) and "(128, 4, 32)" in one_line(e)
    assert "(128, 2, 64)" in one_line(e)
    assert not (tmp_path / "out").exists()


def test_unknown_architecture(tiny, tmp_path):
    _, params, cfg, folder = tiny
    with pytest.raises(hf.ConversionError, match="unknown architecture 'BertForMultipleChoice'"):
        hf.export_params(params, cfg, tmp_path / "out", architecture="BertForMultipleChoice")
    src = tmp_path / "mlm"
    src.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BertForMultipleChoice"]
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(hf.ConversionError) as e:
        hf.import_params(src)
    assert "unknown architecture 'BertForMultipleChoice'" in one_line(e)
    # Reading it as the architecture it really holds works.
    back, _, _ = hf.import_params(src, architecture="BertForPreTraining")
    assert_same_tree(params, back)
    config["model_type"] = "roberta"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.ConversionError, match="model_type 'roberta'"):
        hf.import_params(src)


class Exploding:
    """A leaf with the right shape that fails when pulled to host, half-way through an export."""

    def __init__(self, shape):
        self.shape = shape

    def __array__(self, *args, **kwargs):
        raise RuntimeError("device lost")


def test_failed_export_leaves_nothing(tiny, tmp_path):
    _, params, cfg, _ = tiny
    broken = jax.tree.map(lambda x: x, params)
    broken["nsp"]["kernel"] = Exploding(params["nsp"]["kernel"].shape)
    with pytest.raises(RuntimeError, match="device lost"):
        hf.export_params(broken, cfg, tmp_path / "out", architecture="BertForPreTraining")
    assert list(tmp_path.iterdir()) == []

    # A previous export survives a failed re-export untouched, and is replaced by a good one.
    hf.export_params(params, cfg, tmp_path / "out", architecture="BertForPreTraining", max_shard_bytes=10**5)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(RuntimeError, match="device lost"):
        hf.export_params(broken, cfg, tmp_path / "out", architecture="BertForPreTraining")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    hf.export_params(params, cfg, tmp_path / "out", architecture="BertForPreTraining")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_refuses_foreign_folder(tiny, tmp_path):
    _, params, cfg, _ = tiny
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(hf.ConversionError) as e:
        hf.export_params(params, cfg, tmp_path / "out", architecture="BertForPreTraining")
    assert "not a previous export" in one_line(e) and "notes.txt" in one_line(e)
    with pytest.raises(hf.ConversionError, match="not a previous export"):
        hf.export_tokenizer(write_vocab(tmp_path / "src"), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_bfloat16_export(tiny, tmp_path):
    graphdef, params, cfg, _ = tiny
    folder = hf.export_params(params, cfg, tmp_path / "bf16", architecture="BertForPreTraining",
                              dtype="bfloat16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert load_hf(transformers.AutoModelForPreTraining, folder).dtype == torch.bfloat16  # "auto"
    model = load_hf(transformers.AutoModelForPreTraining, folder, dtype=torch.float32)
    ids, types, mask = random_inputs(cfg.vocab_size, seed=6)
    mlm, nsp = ours(graphdef, params, ids, types, mask)
    out = run_hf(model, ids, types, mask)
    mlm_diff = np.abs(mlm - out.prediction_logits.numpy())[mask == 1].max()
    print(f"\n[tiny bf16 weights] MLM logits max |diff| {mlm_diff:.3g} "
          f"(|logits| up to {np.abs(mlm).max():.3g})")
    assert mlm_diff < 0.05
    back, _, _ = hf.import_params(folder)  # bf16 on disk -> float32 params, rounded
    assert back["mlm_bias"].dtype == np.float32
    rounded = np.asarray(params["mlm_bias"]).astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(back["mlm_bias"], rounded)


# ---------------------------------------------------------------------------------------------
# 6. sharded export
# ---------------------------------------------------------------------------------------------


def test_sharded_export(tiny, tmp_path):
    graphdef, params, cfg, single = tiny
    folder = hf.export_params(params, cfg, tmp_path / "sharded", architecture="BertForPreTraining",
                              max_shard_bytes=300_000)
    names = sorted(p.name for p in folder.iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert len(shards) > 3 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum((folder / n).stat().st_size for n in shards) - sum(
        8 + int.from_bytes((folder / n).read_bytes()[:8], "little") for n in shards)

    ids, types, mask = random_inputs(cfg.vocab_size, seed=7)
    a = run_hf(load_hf(transformers.AutoModelForPreTraining, folder), ids, types, mask)
    b = run_hf(load_hf(transformers.AutoModelForPreTraining, single), ids, types, mask)
    assert torch.equal(a.prediction_logits, b.prediction_logits)
    assert torch.equal(a.seq_relationship_logits, b.seq_relationship_logits)
    back, _, _ = hf.import_params(folder)
    assert_same_tree(params, back)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def test_cli_export(tiny, tmp_path, monkeypatch, capsys):
    _, params, cfg, _ = tiny
    tok_dir = write_vocab(tmp_path / "tok").parent
    seen = []

    def fake_load(src):
        seen.append(src)
        return params, {"size": "tiny", "vocab_size": VOCAB, "max_position": MAX_POS}, tok_dir, "pretrain"

    monkeypatch.setattr(hf_cli, "load_checkpoint_params", fake_load, raising=False)
    hf_cli.main(["export", "--checkpoint", "WORKDIR", "--out", str(tmp_path / "out"), "--max-shard-size", "1MB"])
    assert seen == ["WORKDIR"] and "BertForPreTraining" in capsys.readouterr().out
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert set(hf.TOKENIZER_FILES) <= names and "model.safetensors.index.json" in names
    back, back_cfg, _ = hf.import_params(tmp_path / "out")
    assert back_cfg == cfg
    assert_same_tree(params, back)

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("")
    with pytest.raises(SystemExit) as e:
        hf_cli.main(["export", "--checkpoint", "WORKDIR", "--out", str(tmp_path / "foreign")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_export_reads_the_model_group_strictly(tiny, tmp_path, monkeypatch, capsys):
    """A fine-tuning model group may carry pooling and classifier_dropout; any other key that is
    not a BertConfig field (a typo) is a one-line error, not silently dropped."""
    _, params, cfg, _ = tiny
    cls_params = classifier_params(params, cfg, 2)
    group = {"size": "tiny", "vocab_size": VOCAB, "max_position": MAX_POS, "pooling": "cls",
             "classifier_dropout": 0.1}
    loads = iter([(cls_params, group, None, "finetune"),
                  (params, {**group, "pooling": "mean"}, None, "finetune"),
                  (params, {"size": "tiny", "vocab_size": VOCAB, "max_postion": MAX_POS}, None, "pretrain")])
    monkeypatch.setattr(hf_cli, "load_checkpoint_params", lambda src: next(loads), raising=False)
    hf_cli.main(["export", "--checkpoint", "FT", "--out", str(tmp_path / "cls"), "--labels", "no,yes"])
    assert "BertForSequenceClassification (finetune checkpoint)" in capsys.readouterr().out
    assert hf.import_params(tmp_path / "cls")[1] == cfg
    with pytest.raises(SystemExit):
        hf_cli.main(["export", "--checkpoint", "FT", "--out", str(tmp_path / "mean"),
                 "--architecture", "BertForSequenceClassification"])
    assert "mean-pooled" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        hf_cli.main(["export", "--checkpoint", "PT", "--out", str(tmp_path / "typo")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "'max_postion'" in err


def test_config_from_hf_names_the_family():
    config = hf.hf_config(BertConfig.of_size("tiny", VOCAB), "BertModel")
    assert hf.config_from_hf(config, family="bert") == hf.config_from_hf(config)
    with pytest.raises(hf.ConversionError, match="model_type 'vit' is not supported, only 'bert'"):
        hf.config_from_hf({**config, "model_type": "vit"}, family="bert")
    with pytest.raises(hf.ConversionError, match="not divisible by 3 heads"):
        hf.config_from_hf({**config, "num_attention_heads": 3})
