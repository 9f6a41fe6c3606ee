"""The ViT MAE (models/mae.py): masking, loss, fixed positions, parity with transformers'
ViTMAEForPreTraining (real torch model, same weights, same noise) and sharded equality."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

from models.hf import import_params
from models.mae import (MAEConfig, MAEForPreTraining, mean_loss, patch_kernel_from_conv,
                        patch_kernel_to_conv, patchify, random_masking, reconstruction_sums,
                        sincos_position_table, unpatchify)
from training import mesh as mesh_lib
from training.state import abstract_model, graphdef_and_specs, init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5


def random_pixels(cfg: MAEConfig, batch: int, seed: int = 0) -> np.ndarray:
    shape = (batch, cfg.image_size, cfg.image_size, cfg.num_channels)
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def random_noise(cfg: MAEConfig, batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, cfg.num_patches), dtype=np.float32)


@pytest.fixture(scope="module")
def tiny():
    """(model, config) of the tiny size, initialised in one compiled call (eager init is slow)."""
    cfg = MAEConfig.of_size("tiny")  # 28x28, patch 7: 16 patches, 4 visible
    model_fn = lambda rngs: MAEForPreTraining(cfg, rngs)
    graphdef, _ = graphdef_and_specs(model_fn)
    return nnx.merge(graphdef, jax.jit(lambda: init_params(model_fn, 0))()), cfg


# ---------------------------------------------------------------------------------------------
# Masking and loss
# ---------------------------------------------------------------------------------------------

def test_encoder_sees_only_visible_patches_and_loss_only_masked_ones(tiny):
    model, cfg = tiny

    @nnx.jit
    def forward(model, pixels, noise):  # the model's own __call__, with the latent kept
        latent, mask, ids_restore = model.encode_visible(pixels, noise)
        return latent, mask, model.decoder(latent, ids_restore)

    pixels, noise = random_pixels(cfg, 3), random_noise(cfg, 3)
    latent, mask, logits = forward(model, jnp.asarray(pixels), jnp.asarray(noise))
    assert cfg.num_visible == 4 and latent.shape == (3, cfg.num_visible + 1, cfg.hidden_size)
    assert np.all(np.asarray(mask).sum(1) == cfg.num_masked)

    # Changing the pixels of removed patches changes nothing the encoder computes.
    patches = np.asarray(patchify(pixels, cfg.patch_size)).copy()
    patches[np.asarray(mask) == 1] += 5.0
    changed = np.asarray(unpatchify(patches, cfg.patch_size, cfg.num_channels))
    assert not np.allclose(changed, pixels)
    latent_changed, _, _ = forward(model, jnp.asarray(changed), jnp.asarray(noise))
    np.testing.assert_allclose(latent_changed, latent, atol=1e-6, rtol=0)

    # The loss has no term from a visible patch: its target pixels get zero gradient.
    for norm_pix in (False, True):
        loss = lambda px: reconstruction_sums(logits, px, mask, patch_size=cfg.patch_size,
                                              norm_pix_loss=norm_pix)["mae_loss"]
        grad = np.abs(np.asarray(patchify(jax.grad(loss)(pixels), cfg.patch_size)))
        per_patch = grad.sum(-1)
        assert np.all(per_patch[np.asarray(mask) == 0] == 0)
        assert np.all(per_patch[np.asarray(mask) == 1] > 0)
    sums = reconstruction_sums(logits, pixels, mask, patch_size=cfg.patch_size, norm_pix_loss=False)
    assert float(sums["mae_count"]) == 3 * cfg.num_masked
    assert float(mean_loss(sums)) == pytest.approx(float(sums["mae_loss"]) / (3 * cfg.num_masked))


def test_patchify_round_trip_and_pixel_order():
    cfg = MAEConfig.of_size("tiny", image_size=8, patch_size=4, num_channels=3)
    pixels = random_pixels(cfg, 2)
    patches = np.asarray(patchify(pixels, 4))
    assert patches.shape == (2, 4, 48)
    # Patch 1 is the top-right one; its pixels run (row, column, channel).
    np.testing.assert_array_equal(patches[:, 1].reshape(2, 4, 4, 3), pixels[:, :4, 4:])
    np.testing.assert_array_equal(unpatchify(patches, 4, 3), pixels)
    # The projection of patchified pixels is the strided Conv2d transformers runs.
    weight = np.random.default_rng(1).normal(size=(5, 3, 4, 4)).astype(np.float32)
    kernel = patch_kernel_from_conv(weight)
    np.testing.assert_array_equal(patch_kernel_to_conv(kernel, 4, 3), weight)
    conv = torch.nn.functional.conv2d(torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                                      torch.from_numpy(weight), stride=4)
    np.testing.assert_allclose(patches @ kernel, conv.flatten(2).transpose(1, 2).numpy(),
                               atol=1e-5)


def test_features_cover_all_patches(tiny):
    model, cfg = tiny
    hidden, cls, mean = model.encoder.features(jnp.asarray(random_pixels(cfg, 2)))
    assert hidden.shape == (2, cfg.num_patches + 1, cfg.hidden_size)
    np.testing.assert_array_equal(cls, hidden[:, 0])
    np.testing.assert_allclose(mean, np.asarray(hidden[:, 1:]).mean(1), atol=1e-6)


ONE_BLOCK = dict(num_layers=1, decoder_layers=1)  # compiles faster on the shared CPUs


def test_dropout_follows_its_key_and_bfloat16_runs():
    configs = {name: MAEConfig.of_size("tiny", **ONE_BLOCK, **overrides) for name, overrides in (
        ("plain", {}), ("dropping", dict(dropout=0.2, attention_dropout=0.2)),
        ("half", dict(dtype="bfloat16")))}
    graphdefs = {name: graphdef_and_specs(lambda rngs, c=c: MAEForPreTraining(c, rngs))[0]
                 for name, c in configs.items()}
    cfg = configs["plain"]
    pixels, noise = jnp.asarray(random_pixels(cfg, 2)), jnp.asarray(random_noise(cfg, 2))

    @jax.jit  # one compile for all of them
    def outputs():
        params = init_params(lambda rngs: MAEForPreTraining(cfg, rngs), 0)
        run = lambda name, key=None: nnx.merge(graphdefs[name], params)(pixels, noise, key=key)[0]
        # rbg keys: the model takes any key; threefry's bits compile several times slower.
        key, other = jax.random.key(0, impl="rbg"), jax.random.key(1, impl="rbg")
        return (run("plain"), run("dropping", key), run("dropping", key), run("dropping", other),
                run("dropping"), run("half"))

    reference, a, same_key, other_key, no_key, bf16 = outputs()
    np.testing.assert_array_equal(a, same_key)
    assert not np.allclose(a, other_key) and not np.allclose(a, reference)
    np.testing.assert_array_equal(no_key, reference)  # no key: no dropout
    assert bf16.dtype == jnp.float32 and np.all(np.isfinite(bf16))
    np.testing.assert_allclose(bf16, reference, atol=0.1 * float(np.abs(reference).max()))


@pytest.mark.parametrize("overrides, words", [
    (dict(image_size=30), "image_size 30 is not divisible by patch_size 7"),
    (dict(image_size=28, patch_size=5), "multiple of 5"),
    (dict(mask_ratio=0.0), "must be in (0, 1)"),
    (dict(mask_ratio=1.0), "must be in (0, 1)"),
    (dict(mask_ratio=0.99), "leaves no visible patch"),
])
def test_bad_geometry_is_one_clear_line(overrides, words):
    with pytest.raises(ValueError) as err:
        MAEConfig.of_size("tiny", **overrides)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_sizes_of_the_paper():
    for size, layers, width, patch, patches in (("base", 12, 768, 16, 196),
                                                ("large", 24, 1024, 16, 196),
                                                ("huge", 32, 1280, 14, 256)):
        cfg = MAEConfig.of_size(size)
        assert (cfg.num_layers, cfg.hidden_size, cfg.patch_size, cfg.num_patches) == (
            layers, width, patch, patches)
        assert (cfg.decoder_layers, cfg.decoder_hidden_size, cfg.decoder_heads) == (8, 512, 16)
        assert cfg.num_visible == patches // 4 and cfg.layer_norm_eps == 1e-6


# ---------------------------------------------------------------------------------------------
# transformers' ViTMAEForPreTraining, read through the HuggingFace record (models/hf_mae.py)
# ---------------------------------------------------------------------------------------------

def params_from_torch(model, folder) -> tuple[dict, MAEConfig]:
    """Our pure param dict and config for a ViTMAEForPreTraining, from its in-memory state_dict
    (transformers 5.24 spells it `vit.layers.{i}.attention.q_proj`, `mlp.fc1`, ...) through the
    MAE record; every torch tensor must be used and the fixed sin-cos tables must be ours."""
    folder.mkdir()
    config = {**model.config.to_dict(), "architectures": [type(model).__name__]}
    (folder / "config.json").write_text(json.dumps(config))
    state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
    params, cfg, _ = import_params(folder)  # refuses a tensor it does not map
    ours = nnx.to_pure_dict(nnx.state(abstract_model(lambda rngs: MAEForPreTraining(cfg, rngs)), nnx.Param))
    assert jax.tree.structure(params) == jax.tree.structure(ours)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, ours)
    return params, cfg


FIXED_TABLES = ("vit.embeddings.position_embeddings", "decoder.decoder_pos_embed")


def hf_model(norm_pix_loss: bool, mask_ratio: float = 0.75):
    """A small real ViTMAEForPreTraining with every weight random (seeded) and the fixed tables
    filled by transformers' own code."""
    config = transformers.ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=4, num_channels=3, decoder_hidden_size=16,
        decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
        decoder_intermediate_size=40, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss,
        layer_norm_eps=1e-6)
    torch.manual_seed(0)
    model = transformers.ViTMAEForPreTraining(config).eval()
    # transformers 5.24 leaves both sin-cos tables at zero in a freshly built model (its init
    # skips the already-initialised patch projection); run its own table code, as a released
    # checkpoint (which stores the tables) would have them.
    embeddings = model.vit.embeddings
    embeddings.patch_embeddings.projection._is_hf_initialized = False
    for table in (embeddings.position_embeddings, model.decoder.decoder_pos_embed):
        table._is_hf_initialized = False
    embeddings.initialize_weights()
    model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in FIXED_TABLES:  # LayerNorm scales near 1, everything else near 0
                is_scale = "norm" in name and name.endswith("weight")
                p.copy_(torch.randn(p.shape) * 0.2 + (1.0 if is_scale else 0.0))
    return model


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """{norm_pix_loss: (torch model, our model on the same weights, our config)}."""
    pairs = {}
    for norm_pix in (False, True):
        hf = hf_model(norm_pix)
        params, cfg = params_from_torch(hf, tmp_path_factory.mktemp("torch") / f"norm_pix_{norm_pix}")
        graphdef, _ = graphdef_and_specs(lambda rngs: MAEForPreTraining(cfg, rngs))
        pairs[norm_pix] = (hf, nnx.merge(graphdef, jax.tree.map(jnp.asarray, params)), cfg)
    return pairs


@pytest.mark.parametrize("norm_pix", [False, True])
def test_parity_with_transformers_vit_mae(hf_pair, norm_pix):
    hf, ours, cfg = hf_pair[norm_pix]
    assert cfg.num_patches == 16 and cfg.num_channels == 3 and cfg.num_visible == 4
    pixels, noise = random_pixels(cfg, 4, seed=2), random_noise(cfg, 4, seed=3)
    with torch.no_grad():
        out = hf(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                 noise=torch.from_numpy(noise))
    logits, mask = ours(jnp.asarray(pixels), jnp.asarray(noise))
    loss = mean_loss(reconstruction_sums(logits, pixels, mask, patch_size=cfg.patch_size,
                                         norm_pix_loss=cfg.norm_pix_loss))
    np.testing.assert_array_equal(mask, out.mask.numpy())
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=TOL, rtol=0)
    assert abs(float(loss) - out.loss.item()) < TOL
    print(f"norm_pix_loss={norm_pix}: max |logits diff| "
          f"{np.abs(np.asarray(logits) - out.logits.numpy()).max():.2e}, "
          f"|loss diff| {abs(float(loss) - out.loss.item()):.2e}")


def test_features_match_transformers_encoder_without_masking(hf_pair):
    hf, ours, cfg = hf_pair[False]
    pixels = random_pixels(cfg, 2, seed=4)
    hf.config.mask_ratio = 0.0  # keeps every patch; noise in patch order leaves them in order
    try:
        with torch.no_grad():
            noise = torch.arange(cfg.num_patches, dtype=torch.float32).repeat(2, 1)
            expected = hf.vit(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                              noise=noise).last_hidden_state.numpy()
    finally:
        hf.config.mask_ratio = 0.75
    hidden, cls, _ = ours.encoder.features(jnp.asarray(pixels))
    np.testing.assert_allclose(hidden, expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(cls, expected[:, 0], atol=TOL, rtol=0)


def test_masking_equals_transformers():
    cfg = MAEConfig.of_size("small")  # 49 patches: len_keep = int(49 * 0.25) = 12
    hf = hf_model(False)
    hf.config.mask_ratio = cfg.mask_ratio
    noise = random_noise(cfg, 5, seed=5)
    sequence = torch.arange(5 * 49, dtype=torch.float32).reshape(5, 49, 1)
    kept, mask, restore = hf.vit.embeddings.random_masking(sequence, torch.from_numpy(noise))
    ids_keep, our_mask, our_restore = random_masking(jnp.asarray(noise), cfg.num_visible)
    assert cfg.num_visible == 12 and kept.shape == (5, 12, 1)
    np.testing.assert_array_equal(ids_keep, kept[..., 0].numpy() - 49 * np.arange(5)[:, None])
    np.testing.assert_array_equal(our_mask, mask.numpy())
    np.testing.assert_array_equal(our_restore, restore.numpy())


@pytest.mark.parametrize("grid, width", [(4, 32), (4, 16), (14, 768), (16, 512)])
def test_sincos_tables_equal_transformers(grid, width):
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEEmbeddings

    config = transformers.ViTMAEConfig(hidden_size=width, image_size=grid * 2, patch_size=2)
    embeddings = ViTMAEEmbeddings(config)
    embeddings.initialize_weights()  # transformers' own table (and its h/w swap)
    expected = embeddings.position_embeddings.detach().numpy()[0]
    ours = sincos_position_table(grid, width)
    assert ours.shape == (grid * grid + 1, width) and not ours[0].any()
    np.testing.assert_allclose(ours, expected, atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------

def _mesh(shape):
    data, fsdp, tensor = shape
    return mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)),
                              jax.devices()[: data * fsdp * tensor])


def sharded_forward(shape, cfg, pixels, noise):
    """Loss and logits of a jit forward with params and batch sharded on a mesh of `shape`."""
    mesh = _mesh(shape)
    model_fn = lambda rngs: MAEForPreTraining(cfg, rngs)
    graphdef, specs = graphdef_and_specs(model_fn)
    param_shardings = mesh_lib.shardings_of(specs, mesh)
    params = jax.jit(lambda: init_params(model_fn, 0), out_shardings=param_shardings)()

    def forward(params, batch):
        logits, mask = nnx.merge(graphdef, params)(batch["image"], batch["noise"])
        sums = reconstruction_sums(logits, batch["image"], mask, patch_size=cfg.patch_size,
                                   norm_pix_loss=cfg.norm_pix_loss)
        return mean_loss(sums), logits

    step = jax.jit(forward, in_shardings=(param_shardings, mesh_lib.batch_sharding(mesh)))
    with jax.set_mesh(mesh), spmd.logical_axis_rules(mesh_lib.RULES):
        loss, logits = step(params, mesh_lib.global_batch({"image": pixels, "noise": noise}, mesh))
    return float(loss), np.asarray(logits), params


def test_sharded_forward_equals_single_device():
    cfg = MAEConfig.of_size("tiny", **ONE_BLOCK, norm_pix_loss=True)
    pixels, noise = random_pixels(cfg, 8, seed=6), random_noise(cfg, 8, seed=7)
    loss_1, logits_1, _ = sharded_forward((1, 1, 1), cfg, pixels, noise)
    loss_8, logits_8, params = sharded_forward((2, 2, 2), cfg, pixels, noise)
    assert abs(loss_8 - loss_1) < TOL
    np.testing.assert_allclose(logits_8, logits_1, atol=TOL, rtol=0)
    layer = params["encoder"]["layers"][0]
    assert layer["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert layer["mlp_out"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert params["encoder"]["patch_embed"]["kernel"].sharding.spec == P(None, "fsdp")
