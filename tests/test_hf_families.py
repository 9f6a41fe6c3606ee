"""The family-record machinery of models/hf.py on a small synthetic MAE-like family.

MAE's own record is models/hf_mae.py (tests/test_hf_mae.py); this family has, without a real
model, what ViTMAE's checkpoints need: a patch-embedding conv kernel, an encoder and a decoder of
different depths, fixed sin-cos tables that HuggingFace stores, and the several spellings
transformers 5.24 uses for ViT weights.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from models import hf
from models.hf_table import COPY, Architecture, Family, Rule, conv, dense, norm


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    patch: int = 2
    channels: int = 3
    hidden: int = 8
    decoder_hidden: int = 6
    patches: int = 5
    encoder_layers: int = 3
    decoder_layers: int = 2


HF_KEYS = {"patch": "patch_size", "channels": "num_channels", "hidden": "hidden_size",
           "decoder_hidden": "decoder_hidden_size", "patches": "num_patches",
           "encoder_layers": "num_hidden_layers", "decoder_layers": "decoder_num_hidden_layers"}


def sincos(length: int, dim: int) -> np.ndarray:
    """(1, L, dim) sin-cos table, as MAE's get_1d_sincos_pos_embed (in float64, then float32)."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    freq = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim // 2))
    return np.concatenate([np.sin(pos * freq), np.cos(pos * freq)], axis=1)[None].astype(np.float32)


# K patch size, I input channels, D / E encoder / decoder width, L positions; {i} encoder
# layers, {j} decoder layers.
TOY = Family(
    model_type="toy_mae", config=ToyConfig,
    rules=(
        Rule("patch/kernel", "embeddings.patch_embeddings.projection.weight", "K K I D", conv(2)),
        Rule("patch/bias", "embeddings.patch_embeddings.projection.bias", "D"),
        Rule(None, "embeddings.position_embeddings", "1 L D", COPY,
             fixed=lambda c: sincos(c.patches, c.hidden)),
        *dense("layers/{i}/query", "encoder.layer.{i}.attention.attention.query", "D", "D"),
        *norm("layers/{i}/norm", "encoder.layer.{i}.layernorm_before"),
    ),
    dims={"K": "patch", "I": "channels", "D": "hidden", "E": "decoder_hidden", "L": "patches"},
    depths={"i": "encoder_layers", "j": "decoder_layers"},
    to_hf=lambda c: {HF_KEYS[f.name]: getattr(c, f.name) for f in dataclasses.fields(c)},
    from_hf=lambda d: ToyConfig(**{ours: d[theirs] for ours, theirs in HF_KEYS.items()}),
    base="ToyModel",
    architectures={
        "ToyForPreTraining": Architecture((
            Rule(None, "decoder.decoder_pos_embed", "1 L E",
                 fixed=lambda c: sincos(c.patches, c.decoder_hidden)),
            *dense("decoder/embed", "decoder.decoder_embed", "D", "E"),
            *dense("decoder/layers/{j}/query", "decoder.decoder_layers.{j}.attention.attention.query",
                   "E", "E"),
            *norm("decoder/layers/{j}/norm", "decoder.decoder_layers.{j}.layernorm_before", "E"),
        ), "vit.", marker="decoder"),
        "ToyModel": Architecture(),
    },
    prefix="vit.",
    # transformers 5.24's spellings: in memory (vit.layers.N...q_proj) and ViTMAE's save_pretrained
    # of the decoder (decoder.decoder_encoder.layer.N); the rules say the released names.
    renames=((r"^layers\.(\d+)\.", r"encoder.layer.\1."),
             (r"\.attention\.q_proj\.", ".attention.attention.query."),
             (r"^decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers.")))

CFG = ToyConfig()


@pytest.fixture(autouse=True)
def toy_family(monkeypatch):
    records = hf.records()
    monkeypatch.setattr(hf, "records", lambda: {**records, "toy": TOY})


def random_params(cfg=CFG, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    params: dict = {}
    for e in hf.name_table("ToyForPreTraining", cfg):
        if e.ours is not None:
            node = params
            for k in e.ours[:-1]:
                node = node.setdefault(k, {})
            node[e.ours[-1]] = rng.normal(size=e.shape).astype(np.float32)
    return params


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def stored(folder) -> dict:
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def resave(src, dest, tensors: dict):
    dest.mkdir()
    (dest / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture
def exported(tmp_path):
    params = random_params()
    folder = hf.export_params(params, CFG, tmp_path / "toy", architecture="ToyForPreTraining")
    return params, folder


def test_two_depth_table():
    table = hf.name_table("ToyForPreTraining", CFG)
    names = [e.name for e in table]
    assert [n for n in names if n.endswith("query.weight")] == [
        *(f"vit.encoder.layer.{i}.attention.attention.query.weight" for i in range(3)),
        *(f"decoder.decoder_layers.{j}.attention.attention.query.weight" for j in range(2))]
    ours = {e.ours: e.shape for e in table if e.ours is not None}
    assert ours[("encoder", "layers", 2, "query", "kernel")] == (8, 8)
    assert ours[("decoder", "layers", 1, "query", "kernel")] == (6, 6)
    assert ("decoder", "layers", 2, "query", "kernel") not in ours
    assert [e.name for e in table if e.fixed] == ["vit.embeddings.position_embeddings",
                                                  "decoder.decoder_pos_embed"]
    deeper = hf.name_table("ToyForPreTraining", dataclasses.replace(CFG, decoder_layers=4))
    assert len(deeper) == len(table) + 2 * 4  # two decoder layers more, four rows each
    assert hf.infer_architecture(random_params(), family="toy") == "ToyForPreTraining"
    assert hf.infer_architecture({"encoder": {}}, family="toy") == "ToyModel"


def test_undefined_letter_fails_when_the_family_is_made():
    with pytest.raises(ValueError, match=r"undefined letters \['Q', 'k'\]"):
        dataclasses.replace(TOY, rules=(Rule("x/{k}", "x.{k}.weight", "Q D"),))


def test_conv_layout_round_trip_and_torch_parity():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    k_KKID = rng.normal(size=(2, 2, 3, 8)).astype(np.float32)
    layout = conv(2)
    w = layout.to_hf(k_KKID)
    assert w.shape == layout.hf_shape(k_KKID.shape) == (8, 3, 2, 2)
    np.testing.assert_array_equal(layout.from_hf(w, k_KKID.shape), k_KKID)
    k1 = rng.normal(size=(5, 3, 4)).astype(np.float32)  # a 1-d conv: (k, C_in, D) <-> (D, C_in, k)
    assert conv(1).to_hf(k1).shape == (4, 3, 5)
    np.testing.assert_array_equal(conv(1).from_hf(conv(1).to_hf(k1), k1.shape), k1)

    # Same patch embedding in Flax's layout (NHWC x HWIO) and torch's (NCHW x OIHW).
    x_BHWI = rng.normal(size=(2, 6, 4, 3)).astype(np.float32)
    ours = jax.lax.conv_general_dilated(x_BHWI, k_KKID, (2, 2), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    theirs = torch.nn.functional.conv2d(torch.from_numpy(x_BHWI).permute(0, 3, 1, 2),
                                        torch.from_numpy(np.ascontiguousarray(w)), stride=2)
    np.testing.assert_allclose(np.asarray(ours), theirs.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_export_writes_fixed_tables_and_round_trips(exported):
    params, folder = exported
    tensors = stored(folder)
    np.testing.assert_array_equal(tensors["vit.embeddings.position_embeddings"], sincos(5, 8))
    np.testing.assert_array_equal(tensors["decoder.decoder_pos_embed"], sincos(5, 6))
    np.testing.assert_array_equal(tensors["vit.embeddings.patch_embeddings.projection.weight"],
                                  params["encoder"]["patch"]["kernel"].transpose(3, 2, 0, 1))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "toy_mae" and config["decoder_num_hidden_layers"] == 2
    back, cfg, architecture = hf.import_params(folder)
    assert (cfg, architecture) == (CFG, "ToyForPreTraining")
    assert_same_tree(params, back)  # the fixed tables are no parameters of ours
    enc, _, _ = hf.import_params(folder, architecture="ToyModel")
    assert_same_tree({"encoder": params["encoder"]}, enc)


def test_fixed_table_is_checked_on_import(exported, tmp_path):
    params, folder = exported
    tensors = stored(folder)
    wrong = dict(tensors, **{"decoder.decoder_pos_embed": tensors["decoder.decoder_pos_embed"] + 1e-3})
    with pytest.raises(hf.ConversionError) as e:
        hf.import_params(resave(folder, tmp_path / "wrong", wrong))
    assert "tensor decoder.decoder_pos_embed differs from the fixed table" in str(e.value)
    assert "\n" not in str(e.value)
    # Not stored at all: nothing to check, the model computes it.
    absent = {k: v for k, v in tensors.items() if k != "vit.embeddings.position_embeddings"}
    assert_same_tree(params, hf.import_params(resave(folder, tmp_path / "absent", absent))[0])
    # Stored in bfloat16: equal up to bfloat16's rounding, which is accepted.
    bf16 = hf.export_params(params, CFG, tmp_path / "bf16", architecture="ToyForPreTraining",
                            dtype="bfloat16")
    assert hf.import_params(bf16)[1] == CFG


def test_every_spelling_imports(exported, tmp_path):
    """transformers 5.24's in-memory names (vit.layers.N...q_proj) and its saved decoder names
    (decoder.decoder_encoder.layer.N) read as the released ones."""
    params, folder = exported
    tensors = stored(folder)

    def respell(name):
        name = name.replace("vit.encoder.layer.", "vit.layers.").replace(".attention.attention.query.",
                                                                          ".attention.q_proj.")
        return name.replace("decoder.decoder_layers.", "decoder.decoder_encoder.layer.")

    renamed = {respell(k): v for k, v in tensors.items()}
    assert "vit.layers.2.attention.q_proj.weight" in renamed
    assert "decoder.decoder_encoder.layer.1.attention.q_proj.bias" in renamed
    assert_same_tree(params, hf.import_params(resave(folder, tmp_path / "new", renamed))[0])

    both = {**tensors, "vit.layers.0.attention.q_proj.bias": tensors[
        "vit.encoder.layer.0.attention.attention.query.bias"]}
    with pytest.raises(hf.ConversionError, match="two names of one tensor"):
        hf.import_params(resave(folder, tmp_path / "both", both))
