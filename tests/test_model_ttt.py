"""Test-time training: per-query adapters, restoration, label independence, falling SSL loss."""

from __future__ import annotations

import pytest
import torch

from nlmm.config import config_from_dict
from nlmm.errors import NlmmError
from nlmm.model import NLMM, adapt_and_encode
from nlmm.model.ttt import masked_positions

N_MELS = 8


@pytest.fixture(autouse=True)
def one_thread():
    """Two OpenMP threads on tiny matrices only spin-wait on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(**ttt) -> NLMM:
    torch.manual_seed(0)
    cfg = config_from_dict({
        "d_model": 32, "n_heads": 4, "ffn_mult": 2, "L_mem": 4, "embed_dim": 16,
        "depth": {"text": 2, "image": 2, "audio": 2}, "vocab_size": 64,
        "max_position_embeddings": 64, "patch_size": 8, "audio_stride": 4,
        "cms_levels": [{"name": "fast", "chunk_size": 1}, {"name": "slow", "chunk_size": 8}],
        "ttt": {"enable": True, "adapter_rank": 2, "max_steps": 4, "eta": 1.0, **ttt},
        "data": {"image_size": 16, "n_mels": N_MELS},
    })
    return NLMM(cfg).eval()


def queries(n: int = 5, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.arange(9)[None, :] < torch.randint(3, 10, (n,), generator=g)[:, None]
    audio_mask = torch.arange(40)[None, :] < torch.randint(12, 41, (n,), generator=g)[:, None]
    return {
        "text": (torch.randint(4, 64, (n, 9), generator=g) * text_mask, text_mask),
        "image": (torch.randn(n, 3, 16, 16, generator=g), None),
        "audio": (torch.randn(n, 1, N_MELS, 40, generator=g), audio_mask),
    }


def snapshot(model: NLMM) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("modality", ["text", "image", "audio"])
def test_adapters_move_and_the_model_is_restored_bitwise(modality):
    model = tiny_model()
    x, mask = queries()[modality]
    before = snapshot(model)
    with torch.no_grad():  # as evaluation calls it: gradients are enabled inside
        plain = model.encode(modality, x, mask)
        result = adapt_and_encode(model, modality, x, mask, steps=3, eta=1.0)
    stored = [(b.mixer.adapter.down, b.mixer.adapter.up) for b in model.encoders[modality].blocks]
    assert len(result.adapted) == len(stored) == 2
    for (down, up), (stored_down, stored_up) in zip(result.adapted, stored):
        assert down.shape == (5,) + stored_down.shape and up.shape == (5,) + stored_up.shape
        assert not torch.equal(up, stored_up.expand_as(up))  # the zero up-projection moved
        assert not torch.equal(down, stored_down.expand_as(down))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert all(b.mixer.adapter.rows is None for b in model.encoders[modality].blocks)
    with torch.no_grad():
        plain_after = model.encode(modality, x, mask)
    assert torch.equal(plain_after, plain)
    # an unmoved adapter adds exactly zero, so any difference is the adaptation's doing
    assert (result.embeddings - plain).abs().max() > 1e-5


@pytest.mark.parametrize("modality", ["text", "image", "audio"])
def test_self_supervised_loss_falls(modality):
    model = tiny_model()
    x, mask = queries()[modality]
    steps, eta = (6, 3.0) if modality == "audio" else (4, 1.0)
    losses = adapt_and_encode(model, modality, x, mask, steps=steps, eta=eta).losses
    assert len(losses) == steps
    assert losses[-1] < 0.97 * losses[0], losses


def test_adaptation_depends_on_each_query_alone():
    """Shuffling an eval set's pairing is a permutation of the queries relative to the gallery;
    each query's adapted weights and embedding must follow it unchanged."""
    model = tiny_model()
    x, mask = queries()["text"]
    perm = torch.tensor([3, 0, 4, 1, 2])
    base = adapt_and_encode(model, "text", x, mask, steps=3, eta=1.0)
    shuffled = adapt_and_encode(model, "text", x[perm], mask[perm], steps=3, eta=1.0)
    torch.testing.assert_close(shuffled.embeddings, base.embeddings[perm], rtol=1e-4, atol=1e-5)
    for (d0, u0), (d1, u1) in zip(base.adapted, shuffled.adapted):
        torch.testing.assert_close(d1, d0[perm], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(u1, u0[perm], rtol=1e-4, atol=1e-6)
    alone = adapt_and_encode(model, "text", x[2:3], mask[2:3], steps=3, eta=1.0)
    torch.testing.assert_close(alone.embeddings, base.embeddings[2:3], rtol=1e-4, atol=1e-5)


def test_encode_ttt_uses_the_config_and_zero_steps_is_plain_encoding():
    model = tiny_model()
    x, mask = queries()["audio"]
    with torch.no_grad():
        adapted = model.encode_ttt("audio", x, mask)
        direct = adapt_and_encode(model, "audio", x, mask, steps=4, eta=1.0).embeddings
        plain = model.encode("audio", x, mask)
    torch.testing.assert_close(adapted, direct)
    still = tiny_model(max_steps=0)
    with torch.no_grad():
        torch.testing.assert_close(still.encode_ttt("audio", x, mask), still.encode("audio", x, mask))
    assert (adapted - plain).abs().max() > 1e-4


def test_mask_id_is_the_token_fed_in_place_of_masked_words():
    model = tiny_model()
    x, mask = queries()["text"]
    a = adapt_and_encode(model, "text", x, mask, steps=1, eta=1.0, mask_id=3).losses
    b = adapt_and_encode(model, "text", x, mask, steps=1, eta=1.0, mask_id=5).losses
    assert a[0] != pytest.approx(b[0], rel=1e-6)


def test_masked_positions_pick_a_share_of_each_rows_valid_tokens():
    valid = torch.arange(30)[None, :] < torch.tensor([[30], [7], [1], [20]])
    chosen = masked_positions(valid, 0.25)
    assert not (chosen & ~valid).any()
    assert chosen.sum(1).tolist() == [round(30 * 0.25), round(7 * 0.25), 1, 5]
    padded = torch.nn.functional.pad(valid, (0, 10), value=False)
    assert torch.equal(masked_positions(padded, 0.25)[:, :30], chosen)
    assert len({tuple(row.nonzero().flatten().tolist()) for row in chosen[[0, 3]]}) == 2


def test_inference_mode_is_refused_with_a_clear_error():
    model = tiny_model()
    x, mask = queries()["text"]
    with torch.inference_mode(), pytest.raises(NlmmError, match="no_grad"):
        model.encode_ttt("text", x, mask)
