"""Test-time training: per-query adapters, restoration, label independence, falling SSL loss,
joint training of the self-supervised objective, and `ttt.enable` in evaluation and search."""

from __future__ import annotations

import pytest
import torch

from tiny import NullSink
from nlmm.config import config_from_dict
from nlmm.errors import NlmmError
from nlmm.model import NLMM, adapt_and_encode
from nlmm.model.losses import ContrastiveLoss
from nlmm.model.ttt import masked_positions, ssl_loss, ssl_task

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
        # an untrained model with its blocks switched on: the adapters sit inside the branches
        "layer_scale_init": 0.5,
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


def query_on(modality: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    x, mask = queries()[modality]
    return x.to(device), None if mask is None else mask.to(device)


def snapshot(model: NLMM) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("modality", ["text", "image", "audio"])
def test_adapters_move_and_the_model_is_restored_bitwise(modality, device):
    model = tiny_model().to(device)
    x, mask = query_on(modality, device)
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
def test_self_supervised_loss_falls(modality, device):
    model = tiny_model().to(device)
    x, mask = query_on(modality, device)
    steps, eta = (6, 3.0) if modality == "audio" else (4, 1.0)
    losses = adapt_and_encode(model, modality, x, mask, steps=steps, eta=eta).losses
    assert len(losses) == steps
    assert losses[-1] < 0.97 * losses[0], losses


def test_adaptation_depends_on_each_query_alone(device):
    """Shuffling an eval set's pairing is a permutation of the queries relative to the gallery;
    each query's adapted weights and embedding must follow it unchanged."""
    model = tiny_model().to(device)
    x, mask = query_on("text", device)
    perm = torch.tensor([3, 0, 4, 1, 2], device=device)
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


def test_the_first_position_is_masked_no_more_often_than_the_ratio():
    # frac(0 * golden) = 0 used to rank position 0 first: every row masked its first token
    lengths = torch.arange(1, 65)
    valid = torch.arange(64)[None, :] < lengths[:, None]
    for ratio in (0.15, 0.25):
        chosen = masked_positions(valid, ratio)
        assert chosen[:, 0].float().mean() <= ratio
        assert not chosen[:, 0][lengths >= 2].any()


def test_inference_mode_is_refused_with_a_clear_error():
    model = tiny_model()
    x, mask = queries()["text"]
    with torch.inference_mode(), pytest.raises(NlmmError, match="no_grad"):
        model.encode_ttt("text", x, mask)


# ------------------------------------------------------------------ joint training (aux loss)

def batch_of(n: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    q = queries(n, seed)
    return {"text": q["text"][0], "text_mask": q["text"][1], "image": q["image"][0],
            "audio": q["audio"][0], "audio_mask": q["audio"][1]}


@pytest.mark.parametrize("ttt", [{"enable": True}, {"enable": False}, {"aux_weight": 0.0}])
def test_aux_loss_is_in_the_training_loss_only_when_enabled(ttt):
    model = tiny_model(**ttt).train()
    outputs = ContrastiveLoss.from_config(model.cfg)(model(batch_of())[0])
    pairs = sum(outputs[f"loss_{p}"] for p in ("i2t", "i2a", "t2a")) / 3
    if ttt.get("enable", True) and ttt.get("aux_weight", 0.1) > 0:
        aux = outputs["loss_ttt"]
        assert aux.ndim == 0 and torch.isfinite(aux) and aux > 0
        torch.testing.assert_close(outputs["loss"], pairs + 0.1 * aux)
    else:
        assert "loss_ttt" not in outputs
        torch.testing.assert_close(outputs["loss"], pairs)


def test_aux_loss_gradient_reaches_the_tied_text_head_and_every_trunk():
    model = tiny_model().train()
    forward, _ = model(batch_of())
    forward.loss_ttt.backward()
    tokens = model.encoders["text"].stem.tokens.weight.grad
    assert tokens is not None and tokens.abs().sum() > 0
    for modality in ("text", "image", "audio"):
        for block in model.encoders[modality].blocks:
            grad = block.mixer.qkv.weight.grad
            assert grad is not None and grad.abs().sum() > 0, modality
    # the contrastive side (temperature, pooling heads) takes no part in the aux loss
    assert model.logit_scale.grad is None
    assert all(p.grad is None for p in model.encoders["image"].head.parameters())


def test_reconstruction_target_is_detached_from_the_stem():
    """The image/audio target is the stem output itself; were it differentiable, joint training
    could lower the loss by flattening the stem instead of by learning to predict."""
    model = tiny_model()
    encoder = model.encoders["image"]
    x, _ = queries()["image"]
    clean = encoder.tokens(x, None)[0].detach().requires_grad_(True)
    task = ssl_task(encoder, "image", x, None, tokens=(clean, None))
    assert not task.targets.requires_grad
    states = torch.randn_like(clean).requires_grad_(True)
    task.loss_per_row(states).sum().backward()
    assert states.grad.abs().sum() > 0
    assert clean.grad is None  # states given directly: only the (detached) target touched `clean`
    visible = ssl_loss(model, "image", x, None, tokens=(clean, None))
    visible.backward()
    selected = task.selected
    assert clean.grad[selected].abs().sum() == 0  # masked positions: zeroed input, fixed target
    assert clean.grad[~selected].abs().sum() > 0  # visible positions feed the prediction


def _train(model: NLMM, batch: dict[str, torch.Tensor], steps: int) -> NLMM:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = ContrastiveLoss.from_config(model.cfg)(model(batch)[0])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_joint_training_teaches_the_objective_ttt_adapts_on(device):
    """After a few joint steps the masked-token loss TTT starts from has fallen well below its
    untrained value; training on the contrastive loss alone (what every model was before
    joint training) leaves it where it was, so its gradient carried no learned information."""
    batch = {k: v.to(device) for k, v in batch_of().items()}
    x, mask = batch["text"], batch["text_mask"]

    def start_loss(model: NLMM) -> float:
        return adapt_and_encode(model, "text", x, mask, steps=1, eta=0.1).losses[0]

    untrained = start_loss(tiny_model().to(device))
    joint = start_loss(_train(tiny_model(enable=True).to(device), batch, 24))
    contrastive_only = start_loss(_train(tiny_model(enable=False).to(device), batch, 24))
    assert joint < 0.8 * untrained, (joint, untrained)
    assert contrastive_only > 0.9 * untrained, (contrastive_only, untrained)


# ------------------------------------------------------------------ ttt.enable in eval / search

@pytest.fixture
def checkpoint_with_ttt(tiny_cache, tmp_path, device):
    """A (barely trained) tiny model on the tiny corpus whose config has ttt.enable: true."""
    from nlmm.train.loop import Trainer

    cfg = config_from_dict({
        "d_model": 32, "n_heads": 4, "ffn_mult": 2, "L_mem": 2, "embed_dim": 16,
        "depth": {"text": 1, "image": 1, "audio": 1}, "vocab_size": 300, "patch_size": 8,
        "cms_levels": [{"name": "fast", "chunk_size": 1}],
        "ttt": {"enable": True, "adapter_rank": 2, "max_steps": 1, "eta": 0.1},
        "precision": {"amp": "none"},
        "data": {"image_size": 32, "max_audio_seconds": 2.0, "text_max_len": 16},
        "train": {"batch_size": 4, "epochs": 1, "warmup_steps": 0},
    })
    trainer = Trainer(cfg, tiny_cache, device, tmp_path / "run", NullSink(), log=lambda m: None)
    trainer.train_step([next(iter(trainer.loader(0)))])
    return trainer.checkpoint("last").path


@pytest.fixture
def ttt_calls(monkeypatch):
    """Counts NLMM.encode_ttt calls (the TTT path of evaluation and search)."""
    calls = []
    original = NLMM.encode_ttt

    def counted(self, *args, **kwargs):
        calls.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NLMM, "encode_ttt", counted)
    return calls


def test_eval_follows_the_checkpoint_config_and_no_ttt_overrides_it(checkpoint_with_ttt,
                                                                     ttt_calls, device):
    import json

    from typer.testing import CliRunner

    from nlmm.cli.app import app
    from nlmm.eval.evaluate import evaluate_target

    results = evaluate_target(str(checkpoint_with_ttt), split="test", device=device.type)
    assert results["ttt"] is True and "metrics_ttt" in results
    assert results["ttt_settings"] == {"eta": 0.1, "max_steps": 1, "adapter_rank": 2}
    assert set(ttt_calls) == {"image", "text", "audio"}
    assert results["metrics_ttt"].keys() == results["metrics"].keys()

    ttt_calls.clear()
    off = evaluate_target(str(checkpoint_with_ttt), split="test", device=device.type, ttt=False)
    assert off["ttt"] is False and "metrics_ttt" not in off and not ttt_calls
    assert off["metrics"] == results["metrics"]

    runner = CliRunner()
    out = runner.invoke(app, ["eval", str(checkpoint_with_ttt), "--no-ttt", "--json",
                              "--device", device.type])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["ttt"] is False and not ttt_calls
    out = runner.invoke(app, ["eval", str(checkpoint_with_ttt), "--device", device.type])
    assert out.exit_code == 0, out.output
    assert "test-time training: on (eta=0.1, max_steps=1, adapter_rank=2)" in out.stdout
    assert ttt_calls


def test_search_follows_the_checkpoint_config_and_ttt_false_overrides_it(checkpoint_with_ttt,
                                                                         ttt_calls, device):
    from nlmm.search.engine import Searcher

    searcher = Searcher(checkpoint_with_ttt, device=device.type)
    searcher.query(text="a red circle", target="image", k=2)  # as the dash's search calls it
    assert ttt_calls == ["text"]
    searcher.query(text="a red circle", target="image", k=2, ttt=False)
    assert ttt_calls == ["text"]


def test_the_models_mask_id_is_the_tokenizers():
    """Training's masked-token objective uses MASK_TOKEN_ID (the model imports no tokenizer);
    every tokenizer nlmm trains must put [MASK] at that id, or training and search would mask
    with different tokens."""
    from nlmm.data.tokenizer import TextTokenizer
    from nlmm.model.ttt import MASK_TOKEN_ID

    for texts in (["a dog runs"], ["zebra " * 50, "a b c d e f g h"]):
        assert TextTokenizer.train(texts, 300).mask_id == MASK_TOKEN_ID
