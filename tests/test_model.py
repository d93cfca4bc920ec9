"""NL-MM model: masking, chunked linear attention, gradients, parameter levels, losses, overfit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nlmm.config import config_from_dict
from nlmm.errors import NlmmError
from nlmm.model import NLMM
from nlmm.model.layers import linear_attention
from nlmm.model.losses import ContrastiveLoss

N_MELS = 8


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from two OpenMP threads, and on a shared 2-core machine the
    threads' spin-waiting makes each step an order of magnitude slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides):
    raw = {
        "d_model": 32, "n_heads": 4, "ffn_mult": 2, "L_mem": 4, "embed_dim": 16,
        "depth": {"text": 1, "image": 1, "audio": 1}, "vocab_size": 64,
        "max_position_embeddings": 64, "patch_size": 8, "audio_stride": 4, "linear_chunk": 4,
        "cms_levels": [{"name": "fast", "chunk_size": 1}, {"name": "mid", "chunk_size": 4},
                       {"name": "slow", "chunk_size": 16}],
        "ttt": {"adapter_rank": 2},
        "data": {"image_size": 16, "n_mels": N_MELS},
    }
    raw.update(overrides)
    return config_from_dict(raw)


def make_batch(n: int = 6, text_len: int = 7, frames: int = 24, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, text_len + 1, (n,), generator=g)
    text_mask = torch.arange(text_len)[None, :] < lengths[:, None]
    text = torch.randint(4, 64, (n, text_len), generator=g) * text_mask
    frame_len = torch.randint(5, frames + 1, (n,), generator=g)
    audio_mask = torch.arange(frames)[None, :] < frame_len[:, None]
    return {
        "text": text, "text_mask": text_mask,
        "image": torch.randn(n, 3, 16, 16, generator=g),
        "audio": torch.randn(n, 1, N_MELS, frames, generator=g), "audio_mask": audio_mask,
        "has_audio": torch.ones(n, dtype=torch.bool),
        "image_ids": torch.arange(n),
    }


def training_losses(model: NLMM, batch: dict) -> dict:
    """What the training loop optimises on `batch`: the model's forward, scored by the loss."""
    return ContrastiveLoss.from_config(model.cfg)(model(batch)[0])


def on(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def naive_linear_attention(q, k, v, key_mask):
    """Token-by-token fast-weight memory: S += phi(k) v^T, z += phi(k); o = phi(q) S / phi(q) z."""
    b, h, length, d = q.shape
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    out = torch.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            state = torch.zeros(d, v.shape[-1], dtype=q.dtype)
            norm = torch.zeros(d, dtype=q.dtype)
            for t in range(length):
                if key_mask[bi, t]:
                    state = state + torch.outer(phi_k[bi, hi, t], v[bi, hi, t])
                    norm = norm + phi_k[bi, hi, t]
                out[bi, hi, t] = phi_q[bi, hi, t] @ state / (phi_q[bi, hi, t] @ norm + 1e-6)
    return out


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 16])
def test_chunked_linear_attention_matches_token_loop(chunk):
    g = torch.Generator().manual_seed(chunk)
    q, k = torch.randn(2, 2, 13, 4, generator=g), torch.randn(2, 2, 13, 4, generator=g)
    v = torch.randn(2, 2, 13, 3, generator=g)
    key_mask = torch.ones(2, 13, dtype=torch.bool)
    key_mask[0, 9:] = False
    key_mask[1, 0] = False  # a padded first key: the first query reads an empty memory
    key_mask[1, 6] = False
    expected = naive_linear_attention(q, k, v, key_mask)
    got = linear_attention(q, k, v, key_mask, chunk=chunk)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_linear_attention_ignores_values_at_padded_positions():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, 10, 4, generator=g) for _ in range(3))
    key_mask = torch.ones(2, 10, dtype=torch.bool)
    key_mask[1, 3:5] = False  # holes in the middle: later tokens must not read them
    got = linear_attention(q, k, v, key_mask, chunk=4)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 3:5] = 50.0
    v2[1, :, 3:5] = -50.0
    torch.testing.assert_close(linear_attention(q, k2, v2, key_mask, chunk=4), got)
    torch.testing.assert_close(got, naive_linear_attention(q, k, v, key_mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mixer", ["softmax", "linear"])
def test_padding_and_masked_values_do_not_change_embeddings(mixer, device):
    torch.manual_seed(0)
    model = NLMM(tiny_config(mixer=mixer, depth={"text": 2, "image": 1, "audio": 2})).to(device).eval()
    batch = on(make_batch(), device)
    with torch.no_grad():
        text = model.encode("text", batch["text"], batch["text_mask"])
        audio = model.encode("audio", batch["audio"], batch["audio_mask"])

        extra = 5  # append padding tokens / frames holding arbitrary values
        junk_ids = torch.randint(4, 64, (6, extra), device=device)
        padded_text = torch.cat([batch["text"], junk_ids], 1)
        padded_text_mask = F.pad(batch["text_mask"], (0, extra), value=False)
        text_padded = model.encode("text", padded_text, padded_text_mask)
        junk_frames = 100 * torch.randn(6, 1, N_MELS, 4 * extra, device=device)
        padded_audio = torch.cat([batch["audio"], junk_frames], 3)
        padded_audio_mask = F.pad(batch["audio_mask"], (0, 4 * extra), value=False)
        audio_padded = model.encode("audio", padded_audio, padded_audio_mask)

        changed_text = torch.where(batch["text_mask"], batch["text"],
                                   torch.randint(4, 64, (6, 7), device=device))
        text_changed = model.encode("text", changed_text, batch["text_mask"])
        changed_audio = torch.where(batch["audio_mask"][:, None, None, :], batch["audio"],
                                    torch.randn_like(batch["audio"]) * 10)
        audio_changed = model.encode("audio", changed_audio, batch["audio_mask"])

    assert not torch.allclose(text[0], text[1], atol=1e-3)  # embeddings do depend on content
    torch.testing.assert_close(text_padded, text, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text_changed, text, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(audio_padded, audio, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(audio_changed, audio, rtol=1e-4, atol=1e-5)
    # a valid value does matter: the masks are not hiding everything
    bumped = batch["audio"].clone()
    bumped[0, :, :, 0] += 5.0
    with torch.no_grad():
        assert not torch.allclose(model.encode("audio", bumped, batch["audio_mask"])[0], audio[0], atol=1e-4)


def test_encode_returns_unit_vectors_for_every_modality_and_depth_zero_works():
    torch.manual_seed(0)
    model = NLMM(tiny_config(depth={"text": 0, "image": 0, "audio": 0})).eval()
    batch = make_batch(n=3)
    with torch.no_grad():
        for modality, x, mask in [("text", batch["text"], batch["text_mask"]),
                                  ("image", batch["image"], None),
                                  ("audio", batch["audio"], batch["audio_mask"])]:
            emb = model.encode(modality, x, mask)
            assert emb.shape == (3, 16) and emb.dtype == torch.float32
            torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    outputs = training_losses(model, make_batch(n=3))
    assert torch.isfinite(outputs["loss"])


def test_audio_stem_gives_quarter_length_tokens():
    model = NLMM(tiny_config(audio_stride=4))
    mel = torch.randn(2, 1, N_MELS, 1001)
    mask = torch.ones(2, 1001, dtype=torch.bool)
    mask[1, 400:] = False
    tokens, token_mask = model.encoders["audio"].tokens(mel, mask)
    assert tokens.shape == (2, 251, 32)
    assert token_mask.sum(1).tolist() == [251, 100]


def test_every_trainable_parameter_gets_a_gradient(device):
    torch.manual_seed(0)
    for mixer in ("softmax", "linear"):
        # non-zero gains: at the default 0 a branch's weights get their first gradient at step 2
        model = NLMM(tiny_config(mixer=mixer, layer_scale_init=0.5)).to(device)
        outputs = training_losses(model, on(make_batch(), device))
        outputs["loss"].backward()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        missing = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"{mixer}: no gradient for {missing}"
        adapters = [n for n, p in model.named_parameters() if "adapter" in n]
        assert adapters and all(not p.requires_grad for n, p in model.named_parameters() if "adapter" in n)


def test_zero_layer_scale_starts_every_branch_off_and_its_gain_learns_first():
    torch.manual_seed(0)
    model = NLMM(tiny_config())
    batch = make_batch()
    outputs = training_losses(model, batch)
    outputs["loss"].backward()
    gains = [(n, p) for n, p in model.named_parameters() if n.endswith(".gain")]
    assert gains and all(float(p.abs().sum()) == 0.0 for _, p in gains)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for _, p in gains)
    # switched off, the blocks leave the encoder its stem, pooling and head: blocks don't matter
    torch.manual_seed(0)
    shallow = NLMM(tiny_config(depth={"text": 0, "image": 0, "audio": 0}))
    shallow.load_state_dict(model.state_dict(), strict=False)
    model.eval(), shallow.eval()
    with torch.no_grad():
        for modality in ("image", "text"):
            x = batch[modality]
            mask = batch.get(f"{modality}_mask")
            torch.testing.assert_close(model.encode(modality, x, mask),
                                       shallow.encode(modality, x, mask))


def test_grad_checkpointing_gives_the_same_gradients(device):
    batch = on(make_batch(), device)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = NLMM(tiny_config(train={"grad_checkpointing": checkpointing})).to(device)
        outputs = training_losses(model, batch)
        outputs["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_level_params_partition_parameters_by_cms_level():
    # cms_gains: level puts each level's LayerScale gain in its own group (the default, fast,
    # steps every gain with the fastest level: test_gains_step_with_the_fast_level_by_default)
    cfg = tiny_config(cms_gains="level",
                      cms_levels=[{"name": "mid", "chunk_size": 4}, {"name": "fast", "chunk_size": 1},
                                  {"name": "slow", "chunk_size": 16}])
    model = NLMM(cfg)
    groups = model.level_params()
    assert list(groups) == ["mid", "fast", "slow"]
    seen = [id(p) for params in groups.values() for p in params]
    assert len(seen) == len(set(seen))
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert set(seen) == set(trainable)
    where = {id(p): level for level, params in groups.items() for p in params}
    for pid, name in trainable.items():
        parts = name.split(".")
        if "cms" in parts:
            index = int(parts[parts.index("levels") + 1])
            assert where[pid] == ["mid", "fast", "slow"][index], name
        else:
            assert where[pid] == "fast", name  # the smallest chunk_size, although listed second
    # every level holds parameters of every encoder block:
    # 3 encoders x 1 block x (norm 2 + mlp 4 + LayerScale gain 1)
    assert len(groups["slow"]) == len(groups["mid"]) == 21


def test_gains_step_with_the_fast_level_by_default():
    cfg = tiny_config(cms_levels=[{"name": "fast", "chunk_size": 1},
                                  {"name": "slow", "chunk_size": 16}])
    model = NLMM(cfg)
    groups = model.level_params()
    gains = {id(p) for n, p in model.named_parameters() if ".cms." in n and n.endswith("gain")}
    assert gains and gains <= {id(p) for p in groups["fast"]}
    assert not gains & {id(p) for p in groups["slow"]}
    assert len(groups["slow"]) == 3 * 6  # norm 2 + mlp 4 per encoder, the gains gone to fast


def test_forward_losses_and_weighting():
    torch.manual_seed(0)
    cfg = tiny_config(train={"loss_weights": {"i2t": 2.0, "i2a": 1.0, "t2a": 0.5}})
    model = NLMM(cfg)
    forward, state = model(make_batch())
    outputs = ContrastiveLoss.from_config(cfg)(forward)
    expected = (2.0 * outputs["loss_i2t"] + outputs["loss_i2a"] + 0.5 * outputs["loss_t2a"]) / 3.5
    torch.testing.assert_close(outputs["loss"], expected)
    assert outputs["temperature"].item() == pytest.approx(0.07, rel=1e-5)
    assert state.rows == {"image": 6, "text": 6, "audio": 6}
    assert int(state.tokens["text"]) == int(make_batch()["text_mask"].sum())
    for entropy in state.memory_entropy.values():
        assert 0.0 <= float(entropy) <= torch.log(torch.tensor(4.0)).item() + 1e-5


def test_rows_without_audio_are_excluded(device):
    torch.manual_seed(0)
    model = NLMM(tiny_config()).to(device).eval()
    batch = on(make_batch(), device)
    batch["has_audio"] = torch.tensor([True, False, True, True, False, True], device=device)
    batch["audio_mask"][1] = False  # as the loader sends them: all frames masked
    forward, state = model(batch)
    assert forward.embeddings["audio"].shape == (4, 16) and state.rows["audio"] == 4
    assert forward.audio_rows.tolist() == batch["has_audio"].tolist()
    outputs = ContrastiveLoss.from_config(model.cfg)(forward)
    changed = dict(batch, audio=batch["audio"].clone())
    changed["audio"][[1, 4]] = torch.randn(2, 1, N_MELS, 24, device=device) * 10
    outputs_changed = training_losses(model, changed)
    for key in ("loss_i2a", "loss_t2a", "loss"):
        torch.testing.assert_close(outputs_changed[key], outputs[key])

    no_audio = dict(batch, has_audio=torch.zeros(6, dtype=torch.bool, device=device))
    forward_none, _ = model(no_audio)
    outputs_none = ContrastiveLoss.from_config(model.cfg)(forward_none)
    assert "audio" not in forward_none.embeddings and "loss_i2a" not in outputs_none
    torch.testing.assert_close(outputs_none["loss"], outputs_none["loss_i2t"])

    image_text = {k: batch[k] for k in ("text", "text_mask", "image", "image_ids")}
    outputs_it = training_losses(model, image_text)
    torch.testing.assert_close(outputs_it["loss"], outputs["loss_i2t"])


def test_the_forward_embeds_any_shard_and_the_loss_needs_a_weighted_pair():
    """A data-parallel shard may hold a single spoken caption, too few for an audio pair of its
    own: the forward only embeds, and the loss decides on the whole (gathered) batch."""
    torch.manual_seed(0)
    cfg = tiny_config(train={"loss_weights": {"i2t": 0.0, "i2a": 1.0, "t2a": 1.0}})
    model = NLMM(cfg)
    batch = make_batch()
    batch["has_audio"] = torch.tensor([True] + [False] * 5)
    forward, _ = model(batch)
    assert forward.embeddings["audio"].shape == (1, 16)
    with pytest.raises(NlmmError, match="no modality pair with a positive loss weight"):
        ContrastiveLoss.from_config(cfg)(forward)


def test_bad_inputs_raise_user_errors():
    model = NLMM(tiny_config())
    with pytest.raises(NlmmError, match="image_size=16"):
        model.encode("image", torch.randn(2, 3, 32, 32))
    with pytest.raises(NlmmError, match="no valid"):
        model.encode("text", torch.tensor([[5, 6], [0, 0]]))
    with pytest.raises(NlmmError, match="max_position_embeddings"):
        model.encode("text", torch.randint(4, 64, (1, 65)))
    with pytest.raises(NlmmError, match="modality"):
        model.encode("video", torch.randn(1, 3))


def test_linear_attention_keeps_fp32_state_under_autocast():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 300, 8, generator=g).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_attention(q, k, v, chunk=32)
    expected = linear_attention(q.float(), k.float(), v.float(), chunk=32)
    assert torch.equal(got, expected.bfloat16())  # only the final rounding to bf16


def test_bf16_autocast_forward_backward_is_finite(device):
    torch.manual_seed(0)
    for mixer in ("softmax", "linear"):
        model = NLMM(tiny_config(mixer=mixer)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            outputs = training_losses(model, on(make_batch(), device))
        outputs["loss"].backward()
        assert torch.isfinite(outputs["loss"])
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_overfits_a_fixed_batch(device):
    """120 AdamW steps on 8 triples (two pairs share an image) drive the loss from above 1.5
    to below 0.05 (it reaches about 0.005 after 50 steps)."""
    torch.manual_seed(0)
    model = NLMM(tiny_config(depth={"text": 1, "image": 1, "audio": 1})).to(device)
    batch = make_batch(n=8, seed=3)
    batch["image_ids"] = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5])
    batch["image"][1] = batch["image"][0]
    batch["image"][3] = batch["image"][2]
    batch = on(batch, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(120):
        outputs = training_losses(model, batch)
        optimizer.zero_grad()
        outputs["loss"].backward()
        optimizer.step()
        first = first if first is not None else outputs["loss"].item()
    assert first > 1.5
    assert outputs["loss"].item() < 0.05


@pytest.mark.parametrize("mixer,image_stem", [("softmax", "pool"), ("linear", "pool"),
                                              ("softmax", "stride")])
def test_model_info_matches_a_counted_training_step(mixer, image_stem):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from nlmm.model.info import model_info

    cfg = tiny_config(mixer=mixer, image_stem=image_stem, depth={"text": 2, "image": 1, "audio": 2},
                      data={"image_size": 32, "n_mels": N_MELS})
    info = model_info(cfg, batch_size=4, audio_seconds=0.4, text_len=12)
    torch.manual_seed(0)
    model = NLMM(cfg)
    batch = {"text": torch.randint(4, 64, (4, 12)), "image": torch.randn(4, 3, 32, 32),
             # 0.4 s at a 10 ms hop: 1 + 6400 // 160 = 41 frames, as the cache computes them
             "audio": torch.randn(4, 1, N_MELS, 41), "image_ids": torch.arange(4)}
    # the math backend decomposes attention into counted matmuls
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        outputs = training_losses(model, batch)
        outputs["loss"].backward()
    assert info["flops_per_step"] == pytest.approx(counter.get_total_flops(), rel=0.05)
    assert info["tokens_per_triple"] == {"text": 12, "image": 16, "audio": 11}

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = info["params"]
    assert parts["trainable"] == trainable
    assert sum(parts[k] for k in ("text", "image", "audio", "memory", "heads")) == trainable
    assert parts["memory"] == model.memory.slots.numel() + sum(
        p.numel() for n, p in model.named_parameters() if ".memory" in n)
    assert info["params_per_level"] == {k: sum(p.numel() for p in v) for k, v in model.level_params().items()}
    memory = info["memory_bytes"]
    assert memory["grads"] == 4 * trainable and memory["optimizer"] == 2 * 4 * trainable  # adamw
    assert memory["total"] == pytest.approx(sum(v for k, v in memory.items() if k != "total"))


@pytest.mark.parametrize("mixer,image_stem", [("softmax", "pool"), ("linear", "pool"),
                                              ("softmax", "stride")])
def test_activation_estimate_matches_the_tensors_autograd_saves(mixer, image_stem):
    from nlmm.model.info import model_info

    cfg = tiny_config(mixer=mixer, image_stem=image_stem, d_model=64, linear_chunk=16,
                      precision={"amp": "none"}, depth={"text": 2, "image": 2, "audio": 2},
                      data={"image_size": 64, "n_mels": N_MELS})
    estimate = model_info(cfg, batch_size=8, audio_seconds=2.0, text_len=16)["memory_bytes"]["activations"]
    torch.manual_seed(0)
    model = NLMM(cfg)
    batch = {"text": torch.randint(4, 64, (8, 16)), "image": torch.randn(8, 3, 64, 64),
             "audio": torch.randn(8, 1, N_MELS, 200), "image_ids": torch.arange(8)}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(n for ptr, n in storages.items() if ptr not in weights)
    assert estimate == pytest.approx(saved, rel=0.1)
    checkpointed = model_info(tiny_config(mixer=mixer, image_stem=image_stem, d_model=64,
                                          linear_chunk=16, precision={"amp": "none"},
                                          depth={"text": 2, "image": 2, "audio": 2},
                                          data={"image_size": 64, "n_mels": N_MELS},
                                          train={"grad_checkpointing": True}),
                              batch_size=8, audio_seconds=2.0, text_len=16)["memory_bytes"]["activations"]
    # the stems are not checkpointed: with the pool stem at 64 px they hold ~40 % of the total
    assert checkpointed < 0.75 * estimate


def test_configure_optimizers_steps_cms_levels_at_their_own_frequency(device):
    torch.manual_seed(0)
    model = NLMM(tiny_config()).to(device)
    optimizer = model.configure_optimizers(model.cfg)
    groups = model.level_params()
    batch = on(make_batch(), device)

    def snapshot():
        return {name: [p.detach().clone() for p in params] for name, params in groups.items()}

    def changed(before, name):
        return any(not torch.equal(b, p) for b, p in zip(before[name], groups[name]))

    losses = []
    for step in range(1, 5):
        before = snapshot()
        outputs = training_losses(model, batch)
        losses.append(outputs["loss"].item())
        outputs["loss"].backward()
        optimizer.step_all(step)
        assert changed(before, "fast")
        assert changed(before, "mid") == (step % 4 == 0), step
        assert not changed(before, "slow")
    assert losses[-1] < losses[0]
