"""Each ablation variant's training scheme, the CLIP side channel switch, the context-ablated
validation loss and character-aware pseudo-labels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onestory_jax.config_files import load_config
from onestory_jax.data.embedders import load_embedder, with_character_regions
from onestory_jax.data.pipeline import cosine_to_target, three_shot_example
from onestory_jax.data.prepare import label_embeddings
from onestory_jax.errors import UserError
from onestory_jax.models.memory import select_top_k
from onestory_jax.models.onestory import init_params
from onestory_jax.training.losses import loss_at_sigmas, training_ranking

T, H, W, F = 3, 8, 8, 6
ABLATION = ["memory.patchifier_kernels=[[1,2,4],[1,4,4]]", "memory.frames_per_patchifier=[1,2]"]  # K = 3


def _chosen(strategy: str, warm: bool = False, seed: int = 0) -> set[int]:
    cfg = load_config("tiny", [*ABLATION, f"memory.train_strategy={strategy}"])
    batch = {"memory": jnp.zeros((1, F, H, W, 16)), "memory_valid": jnp.ones((1, F), bool)}
    scores = jnp.array([[0.9, 0.1, 0.8, 0.2, 0.3, 0.7]])
    ranking, candidates = training_ranking(scores, batch, jnp.array(warm), jax.random.key(seed), cfg)
    indices, _, selected = select_top_k(ranking, candidates, 3)
    return {int(i) for i, s in zip(indices[0], selected[0]) if s}


def test_each_variant_trains_on_its_own_frames():
    assert _chosen("onestory") == {0, 2, 5}  # the selector's top 3
    # decoupled warm-up and the base's `random`: K random valid frames, from both memory shots (a recall
    # example's older shot holds the target's character: never only the other one)
    for strategy, warm in (("onestory", True), ("random", False)):
        draws = [_chosen(strategy, warm, seed) for seed in range(12)]
        assert all(len(d) == 3 for d in draws) and len({frozenset(d) for d in draws}) > 3
        assert set().union(*draws) == set(range(F))
    assert _chosen("last_frame") == {5}
    assert _chosen("uniform") == {0, 2, 5}  # evenly spaced over 6 frames
    assert _chosen("recent") == {3, 4, 5}
    assert _chosen("none") == set()


def _batch(cfg, rng, b=2):
    return {
        "target": rng.standard_normal((b, T, H, W, 16)).astype(np.float32),
        "memory": rng.standard_normal((b, F, H, W, 16)).astype(np.float32),
        "memory_valid": np.ones((b, F), bool),
        "labels": np.zeros((b, F), np.float32),
        "text": rng.standard_normal((b, 8, cfg.dit.text_dim)).astype(np.float32),
        "image": np.zeros((b, 4, cfg.dit.image_dim), np.float32),
        "cond": np.zeros((b, T, H, W, 20), np.float32),
    }


def test_validation_loss_without_context_ignores_the_memory():
    cfg = load_config("tiny", ABLATION)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = _batch(cfg, rng)
    other = {**batch, "memory": rng.standard_normal(batch["memory"].shape).astype(np.float32)}
    sigmas = jnp.array([0.5])
    loss = jax.jit(lambda b, keep: loss_at_sigmas(params, b, sigmas, jax.random.key(1), cfg, keep), static_argnums=1)
    assert float(loss(batch, False)[0]) == pytest.approx(float(loss(other, False)[0]), rel=1e-6)
    assert abs(float(loss(batch, True)[0]) - float(loss(other, True)[0])) > 1e-4


def _video(rng, shots=3):
    return {
        "latents": rng.standard_normal((shots, T, H, W, 16)).astype(np.float32),
        "frame_embeddings": rng.standard_normal((shots, T, 5)).astype(np.float32),
        "text": rng.standard_normal((shots, 4, 32)).astype(np.float32),
        "text_lengths": np.full((shots,), 4, np.int32),
        "augmented_first": np.zeros((T, H, W, 16), np.float32),
        "image_tokens": np.ones((4, 16), np.float32),
        "first_image": np.zeros((T, H, W, 16), np.float32),
        "shot_keys": np.arange(shots, dtype=np.int32),
        "id": np.bytes_("v"),
    }


@pytest.mark.parametrize("see", [True, False])
def test_later_shots_see_the_first_image_only_when_configured(see):
    cfg = load_config("tiny", [f"memory.later_shots_see_first_image={str(see).lower()}"])
    example = three_shot_example(_video(np.random.default_rng(0)), np.random.default_rng(1), None, cfg)
    assert np.all(example["image"] == (1.0 if see else 0.0))


def _frame(scene: tuple[int, int, int], colour: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A 32x32 frame of one scene colour with a 6x6 character (3% of the frame) and its mask."""
    frame = np.broadcast_to(np.asarray(scene, np.uint8), (32, 32, 3)).copy()
    mask = np.zeros((32, 32), bool)
    mask[10:16, 10:16] = True
    frame[mask] = colour
    return frame, mask


def test_character_regions_label_the_character_not_the_scene():
    red, blue, snow, forest = (220, 40, 40), (40, 70, 230), (235, 240, 245), (60, 130, 60)
    same_char, same_scene = _frame(forest, red), _frame(snow, blue)
    target = _frame(snow, red)
    _, whole = load_embedder("pixel")
    for embed, char_wins in ((lambda f, m: whole(f), False), (with_character_regions(whole, 0.7), True)):
        feats = [embed(f[None], m[None]) for f, m in (same_char, same_scene, target)]
        char_score, scene_score = (float(cosine_to_target(f, feats[2])[0]) for f in feats[:2])
        assert (char_score > scene_score) == char_wins
    with pytest.raises(UserError, match="character weight"):
        with_character_regions(whole, 1.0)


def test_character_labels_need_masks():
    _, whole = load_embedder("pixel")
    with pytest.raises(UserError, match="masks"):
        label_embeddings([np.zeros((5, 16, 16, 3), np.float32)], None, whole, 5, 0.7)


def test_init_from_needs_a_model_folder_with_the_same_dit(tmp_path):
    from onestory_jax.checkpoint import save_model
    from onestory_jax.models.folder import read_onestory
    from onestory_jax.sharding import make_mesh

    cfg = load_config("tiny")
    mesh = make_mesh(cfg.mesh)
    with pytest.raises(UserError, match="no onestory/"):
        read_onestory(tmp_path, cfg, mesh)
    params = init_params(cfg, jax.random.key(0))
    save_model(tmp_path / "onestory", params, cfg)
    source, loaded = read_onestory(tmp_path, cfg, mesh)
    assert source == cfg
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))
    wider = load_config("tiny", ["dit.ffn_dim=48"])
    with pytest.raises(UserError, match="differs.*ffn_dim 48 != 32"):
        read_onestory(tmp_path, wider, mesh)
    runtime = load_config("tiny", ["dit_runtime.remat_policy=full", "dit_runtime.attention=chunked"])  # not architecture
    assert read_onestory(tmp_path, runtime, mesh)[0] == cfg


def test_a_fine_tune_carries_the_bases_selector_and_derives_its_patchifiers():
    from onestory_jax.models.onestory import memory_params

    base = load_config("tiny", ["memory.patchifier_kernels=[[1,2,2]]", "memory.frames_per_patchifier=[1]"])
    params = init_params(base, jax.random.key(0))
    kernel = params["memory"]["conditioner"]["patchifier_0"]["kernel"]  # [1, 2, 2, 16, D]
    params["memory"]["conditioner"]["patchifier_0"]["kernel"] = kernel + 1.0  # "trained": differs from the DiT's
    variant = load_config("tiny", ABLATION)  # (1,2,4) and (1,4,4)
    memory = memory_params(variant, params["dit"], jax.random.key(1), pretrained=(base, params["memory"]))
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(memory["selector"]), jax.tree.leaves(params["memory"]["selector"]))
    )
    wide = np.asarray(memory["conditioner"]["patchifier_0"]["kernel"])  # (1,2,4): each base weight twice, halved
    np.testing.assert_allclose(wide[:, :, 0::2] * 2, kernel + 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(memory["conditioner"]["patchifier_1"]["kernel"])[:, 0::2, 0::2] * 4, kernel + 1.0, rtol=1e-6
    )
    other = load_config("tiny", [*ABLATION, "memory.num_queries=3"])  # another selector: a fresh one
    fresh = memory_params(other, params["dit"], jax.random.key(1), pretrained=(base, params["memory"]))
    assert fresh["selector"]["queries"].shape[0] == 3
    reading = load_config("tiny", [*ABLATION, "memory.selector_reads_captions=true"])  # the base's, plus phi_C at zero
    extended = memory_params(reading, params["dit"], jax.random.key(1), pretrained=(base, params["memory"]))
    assert not np.any(extended["selector"].pop("phi_c")["kernel"])
    assert jax.tree.all(jax.tree.map(np.array_equal, extended["selector"], params["memory"]["selector"]))


def test_the_one_init_starts_the_patchifiers_from_its_own_dit():
    """`init_fn` derives the patchifiers from the patch embedding of the DiT it makes (no caller re-applies
    it), keeps their logical axes (shardings), and makes a part the same whichever parts are made with it."""
    import flax.linen as nn

    from onestory_jax.models.memory import conditioner_from_patch_embedding
    from onestory_jax.models.onestory import init_fn

    cfg = load_config("tiny")
    boxed = jax.jit(init_fn(cfg))(jax.random.key(0))
    assert isinstance(boxed["memory"]["conditioner"]["patchifier_0"]["kernel"], nn.LogicallyPartitioned)
    params = nn.meta.unbox(boxed)
    pe = params["dit"]["patch_embedding"]
    derived = conditioner_from_patch_embedding(pe["kernel"], pe["bias"], cfg.memory)
    jax.tree.map(np.testing.assert_array_equal, params["memory"]["conditioner"], derived)
    alone = nn.meta.unbox(jax.jit(init_fn(cfg, ["memory"]))(jax.random.key(0)))
    jax.tree.map(np.testing.assert_array_equal, alone, {"memory": params["memory"]})


def test_later_shots_get_no_clip_tokens_when_configured():
    from onestory_jax.sampling.generate import StoryInputs, generate_story, generation_spec

    cfg = load_config("tiny", ["memory.later_shots_see_first_image=false"])
    params = init_params(cfg, jax.random.key(0))
    shots, t = 2, 2
    text = jnp.asarray(np.random.default_rng(0).standard_normal((shots, 8, cfg.dit.text_dim)), jnp.float32)

    def story(tokens):  # no memory frames: shot 2 could only see shot 1 through its CLIP tokens
        inputs = StoryInputs(
            text=text,
            negative=jnp.zeros((8, cfg.dit.text_dim)),
            noise=jnp.ones((shots, t, H, W, 16)),
            active=jnp.ones((shots,), bool),
            done=jnp.zeros((shots,), bool),
            done_latents=jnp.zeros((shots, t, H, W, 16)),
            cond=jnp.zeros((t, H, W, 20)),
            image_tokens=jnp.asarray(tokens, jnp.float32),
            has_start_image=jnp.array(True),
        )
        spec = generation_spec(cfg, "none", None, (H, W), 2, 3.0, "euler", 1.0)
        return np.asarray(generate_story(params, cfg, spec, inputs).latents)

    first, second = (np.random.default_rng(s).standard_normal((cfg.image_encoder.num_tokens, cfg.dit.image_dim)) for s in (1, 2))
    a, b = story(first), story(second)
    assert np.abs(a[0] - b[0]).max() > 1e-4  # shot 1 sees the start image's tokens
    np.testing.assert_array_equal(a[1], b[1])  # shot 2 sees none
