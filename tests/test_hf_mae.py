"""MAE's HuggingFace record (models/hf_mae.py) against real transformers models, float32, CPU:
ViTMAEForPreTraining both ways, ViTMAEModel import, ViTForImageClassification, the image
processor, every spelling transformers 5.24 writes, the command line and one-line errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from models import hf, hf_cli
from models.mae import (MAEConfig, MAEForPreTraining, mean_loss, patch_kernel_to_conv,
                        reconstruction_sums, sincos_position_table)
from training.state import graphdef_and_specs, init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_mae_model import hf_model, random_noise, random_pixels  # noqa: E402

TOL = 1e-5
LABELS = ["zero", "one", "two", "three", "four"]
# 16x16x3 images in 4x4 patches: 16 patches, 4 visible; encoder 2 x 64 wide, decoder 2 x 32.
CFG = MAEConfig.of_size("tiny", image_size=16, patch_size=4, num_channels=3)
GROUP = {"size": "tiny", "image_size": 16, "patch_size": 4, "num_channels": 3}  # a run's model group


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def load_hf(auto_class, folder, **kwargs):
    model, info = auto_class.from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def stored(folder) -> dict:
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def resave(config_src, dest, tensors: dict, **config_changes):
    dest.mkdir()
    config = {**json.loads((config_src / "config.json").read_text()), **config_changes}
    (dest / "config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, dest / "model.safetensors",
              metadata={"format": "pt"})
    return dest


def graphdef_of(cfg):
    return graphdef_and_specs(lambda rngs: MAEForPreTraining(cfg, rngs))[0]


def ours_model(cfg, params):
    """Our MAEForPreTraining on `params` (the decoder may be absent: only the encoder is used)."""
    graphdef = graphdef_of(cfg)
    if "decoder" not in params:
        params = {**init_params(lambda rngs: MAEForPreTraining(cfg, rngs), 0), "encoder": params["encoder"]}
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


@pytest.fixture(scope="module")
def pretrained():
    """Our pretraining params for CFG: a random init with biases, LayerNorms and the class and
    mask tokens moved away from 0 and 1."""
    model_fn = lambda rngs: MAEForPreTraining(CFG, rngs)
    params = jax.tree.map(np.asarray, jax.jit(lambda: init_params(model_fn, 0))())
    rng = np.random.default_rng(100)

    def perturb(path, x):
        name = str(path[-1].key)
        moved = name in ("bias", "scale", "cls_token", "mask_token")
        return (x + rng.normal(0, 0.2, x.shape)).astype(np.float32) if moved else x

    return jax.tree_util.tree_map_with_path(perturb, params)


def classifier_params(params, num_labels, seed=0):
    rng = np.random.default_rng(seed)
    return {"encoder": params["encoder"],
            "classifier": {"kernel": rng.normal(0, 0.5, (CFG.hidden_size, num_labels)).astype(np.float32),
                           "bias": rng.normal(0, 0.5, (num_labels,)).astype(np.float32)}}


def run_hf(model, pixels_BHWC, noise=None):
    with torch.no_grad():
        kwargs = {} if noise is None else {"noise": torch.from_numpy(noise)}
        return model(pixel_values=torch.from_numpy(pixels_BHWC.transpose(0, 3, 1, 2)), **kwargs)


def our_outputs(model, cfg, pixels, noise):
    logits, mask = model(jnp.asarray(pixels), jnp.asarray(noise))
    loss = mean_loss(reconstruction_sums(logits, pixels, mask, patch_size=cfg.patch_size,
                                         norm_pix_loss=cfg.norm_pix_loss))
    return np.asarray(logits), np.asarray(mask), float(loss)


# ---------------------------------------------------------------------------------------------
# 1. ViTMAEForPreTraining: ours -> transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_pix", [False, True])
def test_exported_pretraining_parity(pretrained, tmp_path, norm_pix):
    cfg = dataclasses.replace(CFG, norm_pix_loss=norm_pix)
    folder = hf.export_params(pretrained, cfg, tmp_path / "mae", architecture="ViTMAEForPreTraining")
    theirs = load_hf(transformers.AutoModelForPreTraining, folder)
    assert type(theirs).__name__ == "ViTMAEForPreTraining" and theirs.config.norm_pix_loss is norm_pix
    pixels, noise = random_pixels(cfg, 4, seed=2), random_noise(cfg, 4, seed=3)
    out = run_hf(theirs, pixels, noise)
    logits, mask, loss = our_outputs(ours_model(cfg, pretrained), cfg, pixels, noise)
    np.testing.assert_array_equal(mask, out.mask.numpy())
    logits_diff = np.abs(logits - out.logits.numpy()).max()
    loss_diff = abs(loss - out.loss.item())
    print(f"\n[export, norm_pix_loss={norm_pix}] max |logits diff| {logits_diff:.2e}, "
          f"|loss diff| {loss_diff:.2e} (loss {loss:.4f})")
    assert logits_diff < TOL and loss_diff < TOL


def test_exported_files(pretrained, tmp_path):
    folder = hf.export_params(pretrained, CFG, tmp_path / "mae", architecture="ViTMAEForPreTraining")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "vit_mae" and config["architectures"] == ["ViTMAEForPreTraining"]
    expected = {"layer_norm_eps": 1e-6, "hidden_act": "gelu", "mask_ratio": 0.75,
                "norm_pix_loss": False, "qkv_bias": True, "decoder_hidden_size": 32,
                "decoder_num_hidden_layers": 2, "decoder_num_attention_heads": 2,
                "decoder_intermediate_size": 128, "image_size": 16, "patch_size": 4,
                "num_channels": 3, "hidden_dropout_prob": 0.0}
    assert {k: config[k] for k in expected} == expected
    tensors = stored(folder)
    # The released spelling; the patch kernel as the Conv2d weight; the tokens as (1, 1, width).
    assert "vit.encoder.layer.1.attention.attention.query.weight" in tensors
    assert "decoder.decoder_layers.1.intermediate.dense.bias" in tensors
    np.testing.assert_array_equal(
        tensors["vit.embeddings.patch_embeddings.projection.weight"],
        patch_kernel_to_conv(pretrained["encoder"]["patch_embed"]["kernel"], 4, 3))
    assert tensors["decoder.mask_token"].shape == (1, 1, 32)
    # The fixed tables are transformers' own.
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEEmbeddings
    embeddings = ViTMAEEmbeddings(transformers.ViTMAEConfig(**config))
    embeddings.initialize_weights()
    np.testing.assert_allclose(tensors["vit.embeddings.position_embeddings"],
                               embeddings.position_embeddings.detach().numpy(), atol=1e-7, rtol=0)
    np.testing.assert_array_equal(tensors["decoder.decoder_pos_embed"],
                                  sincos_position_table(4, 32)[None])

    back, back_cfg, architecture = hf.import_params(folder)
    assert (back_cfg, architecture) == (CFG, "ViTMAEForPreTraining")
    assert_same_tree(pretrained, back)
    encoder, _, architecture = hf.import_params(folder, architecture="ViTMAEModel")
    assert architecture == "ViTMAEModel"
    assert_same_tree({"encoder": pretrained["encoder"]}, encoder)


def test_qkv_bias_off_round_trips(pretrained, tmp_path):
    cfg = dataclasses.replace(CFG, qkv_bias=False)
    params = jax.tree.map(lambda x: x, pretrained)
    for part in ("encoder", "decoder"):
        for layer in params[part]["layers"].values():
            for name in ("query", "key", "value"):
                layer[name] = {"kernel": layer[name]["kernel"]}
    folder = hf.export_params(params, cfg, tmp_path / "nobias", architecture="ViTMAEForPreTraining")
    assert not any(k.endswith("query.bias") for k in stored(folder))
    theirs = load_hf(transformers.AutoModelForPreTraining, folder)
    assert theirs.config.qkv_bias is False
    back, back_cfg, _ = hf.import_params(folder)
    assert back_cfg == cfg
    assert_same_tree(params, back)


# ---------------------------------------------------------------------------------------------
# 2. transformers -> ours, in every spelling
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A ViTMAEForPreTraining transformers built (random weights, its own sin-cos tables) and
    saved with save_pretrained."""
    model = hf_model(norm_pix_loss=True)
    folder = tmp_path_factory.mktemp("made") / "pt"
    model.save_pretrained(folder)
    return model, folder


def test_import_transformers_model(made):
    model, folder = made
    names = set(stored(folder))
    assert "decoder.decoder_encoder.layer.0.attention.attention.query.weight" in names  # saved spelling
    assert "vit.encoder.layer.0.attention.attention.query.weight" in names
    params, cfg, architecture = hf.import_params(folder)
    assert architecture == "ViTMAEForPreTraining" and cfg.norm_pix_loss and cfg.layer_norm_eps == 1e-6
    pixels, noise = random_pixels(cfg, 4, seed=4), random_noise(cfg, 4, seed=5)
    out = run_hf(model, pixels, noise)
    logits, mask, loss = our_outputs(ours_model(cfg, params), cfg, pixels, noise)
    np.testing.assert_array_equal(mask, out.mask.numpy())
    logits_diff, loss_diff = np.abs(logits - out.logits.numpy()).max(), abs(loss - out.loss.item())
    print(f"\n[transformers-made] max |logits diff| {logits_diff:.2e}, |loss diff| {loss_diff:.2e}")
    assert logits_diff < TOL and loss_diff < TOL

    # Its encoder alone: from the pretraining folder, and from a ViTMAEModel folder.
    encoder, _, _ = hf.import_params(folder, architecture="ViTMAEModel")
    assert_same_tree({"encoder": params["encoder"]}, encoder)
    model.vit.save_pretrained(folder.parent / "base")
    encoder, base_cfg, architecture = hf.import_params(folder.parent / "base")
    assert architecture == "ViTMAEModel" and base_cfg == cfg
    assert_same_tree({"encoder": params["encoder"]}, encoder)


def test_every_spelling_imports(made, tmp_path):
    """The in-memory state_dict names (vit.layers.N.attention.q_proj, mlp.fc1, ...), the saved
    ones and the released ones (our export) give the same params; two at once are refused."""
    model, folder = made
    params, cfg, _ = hf.import_params(folder)
    in_memory = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert "vit.layers.0.attention.q_proj.weight" in in_memory
    assert "decoder.decoder_layers.1.mlp.fc2.bias" in in_memory
    assert_same_tree(params, hf.import_params(resave(folder, tmp_path / "mem", in_memory))[0])
    released = hf.export_params(params, cfg, tmp_path / "released", architecture="ViTMAEForPreTraining")
    assert stored(released).keys() != stored(folder).keys() != in_memory.keys()
    assert_same_tree(params, hf.import_params(released)[0])

    both = {**stored(folder), "vit.layers.0.mlp.fc1.bias": in_memory["vit.layers.0.mlp.fc1.bias"]}
    with pytest.raises(hf.ConversionError) as e:
        hf.import_params(resave(folder, tmp_path / "both", both))
    assert "two names of one tensor" in one_line(e) and "vit.layers.0.mlp.fc1.bias" in one_line(e)


def test_fresh_transformers_model_has_no_sincos_tables(tmp_path):
    """transformers builds ViTMAE with zero position tables (until initialize_weights): such a
    checkpoint is refused, since our model would compute other positions."""
    config = hf_model(False).config
    transformers.ViTMAEForPreTraining(config).save_pretrained(tmp_path / "fresh")
    with pytest.raises(hf.ConversionError) as e:
        hf.import_params(tmp_path / "fresh")
    assert "differs from the fixed table" in one_line(e)


# ---------------------------------------------------------------------------------------------
# 3. ViTForImageClassification
# ---------------------------------------------------------------------------------------------


def test_classifier_parity(pretrained, tmp_path):
    params = classifier_params(pretrained, len(LABELS))
    folder = hf.export_params(params, CFG, tmp_path / "cls", architecture="ViTForImageClassification",
                              id2label=LABELS)
    theirs = load_hf(transformers.AutoModelForImageClassification, folder)
    assert type(theirs).__name__ == "ViTForImageClassification"
    assert theirs.config.model_type == "vit" and theirs.config.layer_norm_eps == 1e-6
    assert theirs.config.id2label == dict(enumerate(LABELS)) and theirs.config.label2id["two"] == 2
    np.testing.assert_array_equal(theirs.vit.embeddings.position_embeddings.detach().numpy()[0],
                                  sincos_position_table(CFG.grid_size, CFG.hidden_size))

    pixels = random_pixels(CFG, 3, seed=6)
    _, cls, _ = ours_model(CFG, params).encoder.features(jnp.asarray(pixels))
    logits = np.asarray(cls) @ params["classifier"]["kernel"] + params["classifier"]["bias"]
    out = run_hf(theirs, pixels)
    diff = np.abs(logits - out.logits.numpy()).max()
    with torch.no_grad():  # what ViTForImageClassification computes: LayerNorm, then token 0
        hidden = theirs.vit(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state
    np.testing.assert_allclose(cls, hidden[:, 0].numpy(), atol=TOL, rtol=0)
    print(f"\n[ViTForImageClassification] max |logits diff| {diff:.2e}")
    assert diff < TOL

    back, back_cfg, architecture = hf.import_params(folder)
    assert (back_cfg, architecture) == (CFG, "ViTForImageClassification")
    assert_same_tree(params, back)
    # transformers' own save of it (its spelling) reads the same.
    theirs.save_pretrained(tmp_path / "resaved")
    assert_same_tree(params, hf.import_params(tmp_path / "resaved")[0])
    encoder, _, _ = hf.import_params(folder, architecture="ViTMAEModel")
    assert_same_tree({"encoder": params["encoder"]}, encoder)


def test_learned_positions_are_refused(tmp_path):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=64, image_size=16, patch_size=4, num_labels=3)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    with pytest.raises(hf.ConversionError) as e:
        hf.import_params(tmp_path / "vit")
    message = one_line(e)
    assert message.startswith("tensor vit.embeddings.position_embeddings differs from the fixed table")


# ---------------------------------------------------------------------------------------------
# 4. image processor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg, stats", [
    (CFG, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
    (MAEConfig.of_size("tiny"), ((0.1307,), (0.3081,))),  # MNIST: 28x28x1
])
def test_image_processor_matches_our_normalisation(pretrained, tmp_path, cfg, stats):
    from data.images import centre_box, resize_box

    params = pretrained if cfg == CFG else init_params(lambda rngs: MAEForPreTraining(cfg, rngs), 0)
    folder = hf.export_params({"encoder": params["encoder"]}, cfg, tmp_path / "enc",
                              architecture="ViTMAEModel", image_stats=stats)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    assert processor.size == {"height": cfg.image_size, "width": cfg.image_size}
    mean, std = (np.asarray(s, np.float32) for s in stats)
    rng = np.random.default_rng(7)
    for side in (cfg.image_size, 2 * cfg.image_size):  # as is, and shrunk by half
        image = rng.integers(0, 256, (side, side, cfg.num_channels), dtype=np.uint8)
        theirs = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = (resize_box(image, centre_box(side, side), cfg.image_size) - mean) / std
        diff = np.abs(theirs - ours).max()
        print(f"\n[{cfg.num_channels} channel(s), {side}px] max |pixel diff| {diff:.2e}")
        if side == cfg.image_size:
            assert diff < 1e-6
        else:  # PIL resizes in 8-bit fixed point: within one grey level of our float resize
            assert diff <= 1 / 255 / std.min()


# ---------------------------------------------------------------------------------------------
# 5. errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    from models.bert import BertConfig, BertEncoder
    cfg = BertConfig.of_size("tiny", 128, max_position=16)
    with nnx.use_eager_sharding(False):
        encoder = BertEncoder(cfg, nnx.Rngs(0))
    params = {"encoder": nnx.to_pure_dict(nnx.state(encoder, nnx.Param))}
    return hf.export_params(params, cfg, tmp_path_factory.mktemp("bert") / "bert", architecture="BertModel")


def test_other_family_is_refused(pretrained, bert_folder, tmp_path):
    with pytest.raises(hf.ConversionError) as e:
        hf.import_params(bert_folder, architecture="ViTMAEModel")
    assert one_line(e) == f"{bert_folder} holds a bert model, not a ViTMAEModel"
    folder = hf.export_params(pretrained, CFG, tmp_path / "mae", architecture="ViTMAEForPreTraining")
    with pytest.raises(hf.ConversionError) as e:
        hf.import_params(folder, architecture="BertModel")
    assert one_line(e) == f"{folder} holds a vit_mae model, not a BertModel"
    with pytest.raises(hf.ConversionError) as e:
        hf.export_params(pretrained, CFG, tmp_path / "x", architecture="BertForPreTraining")
    assert one_line(e) == "BertForPreTraining needs a BertConfig, got MAEConfig"


def test_channels_and_patch_size_must_match(pretrained, tmp_path):
    folder = hf.export_params(pretrained, CFG, tmp_path / "mae", architecture="ViTMAEForPreTraining")
    weight = "vit.embeddings.patch_embeddings.projection.weight"
    for change, implied in ((dict(num_channels=1), (64, 1, 4, 4)), (dict(patch_size=2), (64, 3, 2, 2))):
        with pytest.raises(hf.ConversionError) as e:
            hf.import_params(resave(folder, tmp_path / str(change), stored(folder), **change))
        assert one_line(e) == f"tensor {weight} has shape (64, 3, 4, 4) but config.json implies {implied}"
    grey = dataclasses.replace(CFG, num_channels=1)
    with pytest.raises(hf.ConversionError) as e:
        hf.export_params(pretrained, grey, tmp_path / "grey", architecture="ViTMAEForPreTraining")
    assert one_line(e) == ("params encoder/patch_embed/kernel has shape (48, 64) but the config "
                           "needs (4*4*1, 64) = (16, 64)")
    assert not (tmp_path / "grey").exists()


def test_image_processor_errors(pretrained, tmp_path):
    export = lambda **kw: hf.export_params(pretrained, CFG, tmp_path / "out",
                                           architecture="ViTMAEForPreTraining", **kw)
    with pytest.raises(hf.ConversionError) as e:
        export(image_stats=((0.5,), (0.5,)))
    assert one_line(e) == "image_mean [0.5] must have one value per channel (3)"
    with pytest.raises(hf.ConversionError) as e:
        export(image_stats=((0.5,) * 3, (0.5, 0.0, 0.5)))
    assert "must be positive" in one_line(e)
    with pytest.raises(hf.ConversionError) as e:
        export(tokenizer=tmp_path / "vocab.txt")
    assert "reads images" in one_line(e)
    assert not (tmp_path / "out").exists()


def test_config_from_hf():
    config = hf.hf_config(CFG, "ViTMAEForPreTraining")
    assert hf.config_from_hf(config, family="mae") == CFG
    vit = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=64, image_size=[16, 16], patch_size=4).to_dict()
    cfg = hf.config_from_hf(vit)  # no decoder: ViTMAE's defaults, transformers' eps
    assert (cfg.hidden_size, cfg.image_size, cfg.decoder_hidden_size) == (32, 16, 512)
    assert cfg.layer_norm_eps == 1e-12
    for changes, words in ((dict(hidden_act="gelu_new"), "hidden_act='gelu_new'"),
                           (dict(image_size=[16, 8]), "only square images"),
                           (dict(patch_size=5), "not divisible by patch_size 5")):
        with pytest.raises(hf.ConversionError) as e:
            hf.config_from_hf({**config, **changes})
        assert words in one_line(e)
    with pytest.raises(hf.ConversionError, match="config.json lacks 'hidden_size'"):
        hf.config_from_hf({k: v for k, v in config.items() if k != "hidden_size"})


# ---------------------------------------------------------------------------------------------
# 6. command line
# ---------------------------------------------------------------------------------------------


def fake_run(tmp_path, monkeypatch, params, run_config, kind):
    """A workdir whose config.json is `run_config`, with `params` as its checkpoint."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(run_config))
    monkeypatch.setattr(hf_cli, "load_checkpoint_params",
                        lambda src: (params, run_config["model"], None, kind), raising=False)
    return workdir


def test_cli_exports_a_pretraining_run(pretrained, tmp_path, monkeypatch, capsys):
    stats = [[0.4, 0.5, 0.6], [0.2, 0.25, 0.3]]
    run = {"family": "mae", "model": GROUP, "data": {"source": "tfds:x", "image_mean": stats[0],
                                                     "image_std": stats[1]}}
    workdir = fake_run(tmp_path, monkeypatch, pretrained, run, "pretrain")
    hf_cli.main(["export", "--checkpoint", str(workdir / "checkpoints" / "3"), "--out", str(tmp_path / "out")])
    assert "wrote ViTMAEForPreTraining (pretrain checkpoint)" in capsys.readouterr().out
    back, cfg, _ = hf.import_params(tmp_path / "out")
    assert cfg == CFG
    assert_same_tree(pretrained, back)
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert [processor["image_mean"], processor["image_std"]] == stats
    # The encoder alone, on request; a run without stats gets its dataset's.
    run = {"family": "mae", "model": {**GROUP, "num_channels": 1}, "data": {"source": "mnist"}}
    grey = dataclasses.replace(CFG, num_channels=1)
    params = {"encoder": init_params(lambda rngs: MAEForPreTraining(grey, rngs), 0)["encoder"]}
    workdir = fake_run(tmp_path / "grey", monkeypatch, params, run, "pretrain")
    hf_cli.main(["export", "--checkpoint", str(workdir), "--out", str(tmp_path / "grey_out"),
             "--architecture", "ViTMAEModel"])
    processor = json.loads((tmp_path / "grey_out" / "preprocessor_config.json").read_text())
    assert [processor["image_mean"], processor["image_std"]] == [[0.1307], [0.3081]]
    assert hf.import_params(tmp_path / "grey_out")[1:] == (grey, "ViTMAEModel")


def test_cli_exports_a_finetuning_run(pretrained, tmp_path, monkeypatch, capsys):
    params = classifier_params(pretrained, 3)
    run = {"family": "mae", "model": {**GROUP, "pooling": "cls", "classifier_dropout": 0.1},
           "data": {"source": "tfds:x", "task": "x"}}
    workdir = fake_run(tmp_path, monkeypatch, params, run, "finetune")
    hf_cli.main(["export", "--checkpoint", str(workdir), "--out", str(tmp_path / "cls"), "--labels", "a,b,c"])
    assert "wrote ViTForImageClassification (finetune checkpoint)" in capsys.readouterr().out
    assert json.loads((tmp_path / "cls" / "config.json").read_text())["label2id"] == {"a": 0, "b": 1, "c": 2}
    assert_same_tree(params, hf.import_params(tmp_path / "cls")[0])
    processor = json.loads((tmp_path / "cls" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.485, 0.456, 0.406]  # three channels: ImageNet's

    run["model"]["pooling"] = "mean"
    workdir = fake_run(tmp_path / "mean", monkeypatch, params, run, "finetune")
    with pytest.raises(SystemExit) as e:
        hf_cli.main(["export", "--checkpoint", str(workdir), "--out", str(tmp_path / "mean_out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "mean-pooled" in err and "--architecture ViTMAEModel" in err
    hf_cli.main(["export", "--checkpoint", str(workdir), "--out", str(tmp_path / "mean_out"),
             "--architecture", "ViTMAEModel"])
    assert_same_tree({"encoder": params["encoder"]}, hf.import_params(tmp_path / "mean_out")[0])


@pytest.mark.parametrize("run, words", [
    ({"family": "mae", "model": {**GROUP, "pach_size": 4}}, "mae model config has unknown key(s) 'pach_size'"),
    ({"family": "mae", "model": {"image_size": 16}}, "the run's mae model config lacks 'size'"),
    ({"family": "mae", "model": {**GROUP, "pooling": "cls"}}, "'pooling'"),  # not in pretraining
    ({"family": "vit", "model": GROUP}, "family 'vit' has no HuggingFace export"),
    ({"family": "mae", "model": {**GROUP, "num_channels": 1}}, "encoder/patch_embed/kernel"),
])
def test_cli_errors_are_one_line(pretrained, tmp_path, monkeypatch, capsys, run, words):
    workdir = fake_run(tmp_path, monkeypatch, pretrained, run, "pretrain")
    with pytest.raises(SystemExit) as e:
        hf_cli.main(["export", "--checkpoint", str(workdir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert words in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_another_familys_architecture(pretrained, tmp_path, monkeypatch, capsys):
    workdir = fake_run(tmp_path, monkeypatch, pretrained, {"family": "mae", "model": GROUP}, "pretrain")
    with pytest.raises(SystemExit):
        hf_cli.main(["export", "--checkpoint", str(workdir), "--out", str(tmp_path / "out"),
                 "--architecture", "BertModel"])
    err = capsys.readouterr().err
    assert "BertModel is no mae architecture; choose one of ViTForImageClassification" in err
