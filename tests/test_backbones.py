"""Pretrained backbones: extraction, weights loading, the frozen-feature cache, training and search.

No test downloads anything: weights files are written here from randomly initialised torchvision
/ torchaudio models (resnet18 at 64 px, the 2-layer wav2vec2_tiny), and the named-weights path
is driven into its offline error through an unreachable proxy and an empty torch home.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from tiny import ListSink
from nlmm.backbones import (Backbone, BackboneSpec, build_full_network, download_named_weights,
                            extract, truncate)
from nlmm.config import AUDIO_BACKBONES, IMAGE_BACKBONES, ConfigError, DataConfig, resolve_config
from nlmm.data import backbone_features
from nlmm.data.backbone_features import FEATURES_DIR
from nlmm.data.cache import prepare
from nlmm.data.features import PCM_SCALE, load_clip, load_image, normalize_images
from nlmm.data.loader import TrainLoader, iter_modality
from nlmm.errors import NlmmError
from nlmm.model import NLMM
from nlmm.model.losses import ContrastiveLoss
from nlmm.inference.checkpoint import load_checkpoint
from nlmm.train.loop import Trainer

DATA = DataConfig(image_size=64, max_audio_seconds=2.0, text_max_len=16)


@dataclass
class WeightFiles:
    image: Path
    audio: Path


def image_spec(weights: Path | str = "DEFAULT", layer: int = 4, frozen: bool = True,
               name: str = "resnet18") -> BackboneSpec:
    return BackboneSpec("image", name, str(weights), layer, frozen, 0.1)


def audio_spec(weights: Path | str = "DEFAULT", layer: int = 2, frozen: bool = True,
               name: str = "wav2vec2_tiny") -> BackboneSpec:
    return BackboneSpec("audio", name, str(weights), layer, frozen, 0.1)


def save_random_weights(spec: BackboneSpec, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(build_full_network(spec).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> WeightFiles:
    folder = tmp_path_factory.mktemp("weights")
    return WeightFiles(save_random_weights(image_spec(), folder / "resnet18.pt", 1),
                       save_random_weights(audio_spec(), folder / "tiny.pt", 2))


def backbone_cfg(files: WeightFiles, *extra: str):
    return resolve_config("tiny_nlmm", [
        "d_model=32", "embed_dim=32", "n_heads=2", "L_mem=4", "ffn_mult=2",
        "depth={text: 1, image: 1, audio: 1}", "data.image_size=64", "data.max_audio_seconds=2.0",
        "data.text_max_len=16", "train.batch_size=16", "train.log_every=1",
        "train.warmup_steps=0", "train.schedule=constant",
        "encoders.image.backbone=resnet18", f"encoders.image.weights={files.image}",
        "encoders.audio.backbone=wav2vec2_tiny", f"encoders.audio.weights={files.audio}", *extra])


def loaded_backbone(spec: BackboneSpec) -> Backbone:
    backbone = Backbone(spec, DATA.image_size)
    backbone.load_pretrained(progress=False)
    return backbone.eval()


# --------------------------------------------------------------------------- config

def test_config_section_defaults_to_none_and_validates_names_layers_and_inputs():
    cfg = resolve_config("tiny_cpu")
    assert cfg.encoders.backbone("image") is None and cfg.encoders.backbone("audio") is None
    assert not NLMM(resolve_config("tiny_cpu", ["depth={text: 1, image: 1, audio: 1}"])).backbones()
    with pytest.raises(ConfigError, match=r"encoders\.image\.backbone must be none or one of "
                                          r"resnet18, .*vit_b_16.*, got 'resnet5'"):
        resolve_config("tiny_cpu", ["encoders.image.backbone=resnet5"])
    with pytest.raises(ConfigError, match=r"encoders\.audio\.layer=13 but HUBERT_BASE has 12 layers"):
        resolve_config("flickr8k", ["encoders.audio.backbone=HUBERT_BASE", "encoders.audio.layer=13"])
    with pytest.raises(ConfigError, match=r"takes 224 px images but data\.image_size=64"):
        resolve_config("tiny_cpu", ["encoders.image.backbone=vit_b_16"])
    with pytest.raises(ConfigError, match=r"needs 16000 Hz audio but data\.sample_rate=8000"):
        resolve_config("flickr8k", ["encoders.audio.backbone=HUBERT_BASE", "data.sample_rate=8000"])
    with pytest.raises(ConfigError, match=r"wav2vec2_tiny has no named weights"):
        resolve_config("tiny_cpu", ["encoders.audio.backbone=wav2vec2_tiny"])
    shipped = resolve_config("flickr8k_pretrained")
    assert shipped.encoders.image.backbone == "resnet50" and shipped.encoders.image.frozen
    assert shipped.encoders.audio.backbone == "HUBERT_BASE" and shipped.encoders.audio.frozen


def test_backbone_tables_match_the_libraries():
    assert set(IMAGE_BACKBONES) <= set(torchvision.models.list_models())
    for name, layers in IMAGE_BACKBONES.items():
        if name.startswith("vit_"):  # block counts from torchvision's own builders, on meta
            with torch.device("meta"):
                assert len(torchvision.models.get_model(name).encoder.layers) == layers, name
        else:
            assert layers == 4
    for name, layers in AUDIO_BACKBONES.items():
        if name == "wav2vec2_tiny":
            continue
        bundle = getattr(torchaudio.pipelines, name)
        assert type(bundle) is torchaudio.pipelines.Wav2Vec2Bundle, name
        assert bundle._params["encoder_num_layers"] == layers and bundle.sample_rate == 16000, name


# --------------------------------------------------------------------------- extraction

def test_resnet_tokens_are_torchvisions_stage_outputs(weights):
    spec = image_spec(weights.image)
    full = build_full_network(spec).eval()
    full.load_state_dict(torch.load(weights.image))
    x = normalize_images(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    reference = create_feature_extractor(full, {"layer3": "l3", "layer4": "l4", "flatten": "pool"})
    with torch.no_grad():
        ref = reference(x)
        for layer, key in ((3, "l3"), (4, "l4")):
            tokens, mask = loaded_backbone(image_spec(weights.image, layer))(x, None)
            assert mask is None
            torch.testing.assert_close(tokens, ref[key].flatten(2).transpose(1, 2))
    # the classifier's pooled input is the mean of the layer-4 tokens
    torch.testing.assert_close(tokens.mean(dim=1), ref["pool"], rtol=1e-4, atol=1e-5)


def test_vit_tokens_are_the_encoder_blocks_patch_outputs():
    torch.manual_seed(0)
    net = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2,
                                               num_heads=2, hidden_dim=16, mlp_dim=32).eval()
    x = torch.randn(3, 3, 32, 32)
    final_norm = net.encoder.ln
    seen = {}
    net.encoder.layers[0].register_forward_hook(lambda m, i, out: seen.setdefault("block1", out))
    with torch.no_grad():
        encoded = net.encoder(torch.cat([net.class_token.expand(3, -1, -1), net._process_input(x)], 1))
        block1, _ = extract(net, image_spec(layer=1, name="vit_b_16"), False, x, None)
        spec = image_spec(layer=2, name="vit_b_16")
        tokens, _ = extract(truncate(net, spec), spec, False, x, None)
        assert tokens.shape == (3, 4, 16)  # (32/16)^2 patches, class token dropped
        torch.testing.assert_close(final_norm(tokens), encoded[:, 1:])
    torch.testing.assert_close(block1, seen["block1"][:, 1:])


def test_speech_frames_are_torchaudios_layer_output_and_padding_changes_nothing(weights):
    spec = audio_spec(weights.audio, layer=1)
    full = build_full_network(spec).eval()
    full.load_state_dict(torch.load(weights.audio))
    backbone = loaded_backbone(spec)
    assert backbone.pads_exactly  # layer-norm extractor: batching with padding is exact
    torch.manual_seed(0)
    waves = torch.randn(2, 16000) * 0.1
    mask = torch.ones(2, 16000, dtype=torch.bool)
    mask[1, 9000:] = False
    with torch.no_grad():
        frames, frame_mask = backbone(waves, mask)
        alone, alone_mask = backbone(waves[1:, :9000], None)
        layers, _ = full.extract_features(waves[:1], None)
    assert alone_mask is None and frame_mask[1].sum() == alone.shape[1] < frame_mask[0].sum()
    torch.testing.assert_close(frames[0], layers[0][0])  # layer 1 of the untruncated model
    torch.testing.assert_close(frames[1, :alone.shape[1]], alone[0], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- weights

def test_weights_file_is_loaded_and_a_wrong_file_is_refused(weights, tmp_path):
    backbone = loaded_backbone(image_spec(weights.image))
    saved = torch.load(weights.image)
    for name, value in backbone.net.state_dict().items():
        torch.testing.assert_close(value, saved[name], msg=name)
    assert "fc.weight" not in backbone.net.state_dict()  # the classifier is dropped
    with pytest.raises(NlmmError, match=r"does not hold resnet18 weights \(0 missing, 0 unexpected "
                                        r"and 1 wrongly shaped tensors, e\.g\. 'conv1\.weight'\)"):
        saved["conv1.weight"] = saved["conv1.weight"][:32]
        torch.save(saved, tmp_path / "bad.pt")
        loaded_backbone(image_spec(tmp_path / "bad.pt"))
    with pytest.raises(NlmmError, match=r"does not hold resnet18 weights"):
        loaded_backbone(image_spec(weights.audio))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(NlmmError, match=r"junk\.pt is not a readable state dict"):
        loaded_backbone(image_spec(tmp_path / "junk.pt"))
    with pytest.raises(NlmmError, match=r"missing\.pt does not exist"):
        loaded_backbone(image_spec(tmp_path / "missing.pt"))


def test_named_weights_offline_say_which_file_to_fetch_and_where(tmp_path, monkeypatch):
    # urlopen caches its opener, proxies included, for the whole process: start a fresh one
    # here and drop it afterwards so no later test inherits the unreachable proxy
    monkeypatch.setattr(urllib.request, "_opener", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(NlmmError) as err:
        download_named_weights(image_spec("IMAGENET1K_V1"), progress=False)
    message = str(err.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert f"put the file in {folder}/" in message and "encoders.image.weights" in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence
    with pytest.raises(NlmmError, match=r"fetch https://download\.pytorch\.org/torchaudio/models/"
                                        r"hubert_fairseq_base_ls960\.pth"):
        download_named_weights(audio_spec(name="HUBERT_BASE"), progress=False)
    with pytest.raises(NlmmError, match=r"resnet18 has no weights named 'IMAGENET9'.*IMAGENET1K_V1"):
        download_named_weights(image_spec("IMAGENET9"), progress=False)
    assert not folder.exists() or not any(folder.iterdir())  # nothing half-downloaded


# --------------------------------------------------------------------------- the feature cache

def test_prepare_caches_exactly_what_the_backbone_gives_each_file(tiny_corpus, weights, tmp_path,
                                                                  monkeypatch):
    cfg = backbone_cfg(weights)
    cache = prepare(tiny_corpus.root, cfg.data, 300, cache_dir=tmp_path / "cache", workers=1,
                    progress=False, encoders=cfg.encoders)
    image, audio = cache.features["image"], cache.features["audio"]
    assert image.values.shape == (cache.n_images, 4, 512) and image.values.dtype == np.float16
    image_net, audio_net = loaded_backbone(image_spec(weights.image)), \
        loaded_backbone(audio_spec(weights.audio))
    with torch.no_grad():
        for row in (0, cache.n_images - 1):
            pixels = torch.from_numpy(load_image(cache.image_path(row), 64))[None]
            expected, _ = image_net(normalize_images(pixels), None)
            np.testing.assert_allclose(image.values[row], expected[0].numpy(), rtol=2e-3, atol=2e-3)
        rows = cache.split_audio_captions("train")
        for row in rows[:3]:
            wave = torch.from_numpy(load_clip(cache.wav_path(row), cache.data_cfg))[None]
            expected, _ = audio_net(wave, None)
            got = audio.values[audio.offsets[row]:audio.offsets[row] + audio.lengths[row]]
            np.testing.assert_allclose(got, expected[0].numpy(), rtol=2e-3, atol=2e-3)
    silent = cache.mel_lengths == 0
    assert ((audio.lengths > 0) == ~silent).all()
    x, mask, rows = next(iter_modality(cache, "train", "audio", 4))
    assert x.dtype == torch.float32 and x.shape[2] == 64 and (mask.sum(1).numpy() ==
                                                              audio.lengths[rows]).all()

    def no_rebuild(*_args, **_kwargs):
        raise AssertionError("a fresh feature set was rebuilt")

    monkeypatch.setattr(backbone_features, "_build", no_rebuild)
    again = prepare(tiny_corpus.root, cfg.data, 300, cache_dir=tmp_path / "cache", workers=1,
                    progress=False, encoders=cfg.encoders)
    assert again.features["image"].path == image.path


def test_feature_cache_is_rebuilt_when_backbone_layer_or_weights_file_change(tiny_corpus, weights,
                                                                            tmp_path):
    own = tmp_path / "resnet18.pt"
    own.write_bytes(weights.image.read_bytes())

    def image_features(*extra: str):
        cfg = backbone_cfg(weights, f"encoders.image.weights={own}", "encoders.audio.backbone=none",
                           *extra)
        cache = prepare(tiny_corpus.root, cfg.data, 300, cache_dir=tmp_path / "cache", workers=1,
                        progress=False, encoders=cfg.encoders)
        return cache.features["image"]

    stage4 = image_features()
    stage3 = image_features("encoders.image.layer=3")
    assert stage3.path != stage4.path and stage3.values.shape == (stage4.values.shape[0], 16, 256)
    assert stage4.path.is_dir()  # another layer's set stays: switching back costs nothing
    save_random_weights(image_spec(), own, seed=7)  # the same file, other weights
    retrained = image_features()
    assert retrained.path != stage4.path and not stage4.path.exists() and stage3.path.exists()
    assert not np.allclose(retrained.values, stage4.values)
    assert json.loads((retrained.path / "manifest.json").read_text())["params"]["weights_identity"] \
        .startswith("sha256:")
    folders = sorted(p.name.split("-")[1] for p in (tmp_path / "cache" / FEATURES_DIR).iterdir()
                     if p.is_dir())
    assert folders == ["resnet18", "resnet18"]
    # another backbone with the same weights identity and layer gets its own folder too
    base = prepare(tiny_corpus.root, DATA, 300, cache_dir=tmp_path / "cache", workers=1,
                   progress=False)
    folder = {name: backbone_features.FeaturePlan("image", image_spec(own, name=name), "x")
              .folder(base) for name in ("resnet18", "resnet34")}
    assert folder["resnet18"] != folder["resnet34"]


# --------------------------------------------------------------------------- training and search

@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    """A 32-image synthetic corpus (22 train images, 110 triples) with clips of at most 2 s."""
    from nlmm.data.synth import synth_corpus

    root = tmp_path_factory.mktemp("small_synth") / "corpus"
    synth_corpus(root, n_images=32, seed=0, wav_seconds_max=2.0, engine="builtin", workers=1,
                 progress=False)
    return root


def test_training_on_cached_features_then_search_queries_go_through_the_backbone(
        small_synth, weights, tmp_path):
    from nlmm.search.engine import Searcher

    cfg = backbone_cfg(weights, "train.epochs=2", "train.eval_every=2")
    cache = prepare(small_synth, cfg.data, cfg.vocab_size, workers=1, progress=False,
                    encoders=cfg.encoders)
    trainer = Trainer(cfg, cache, torch.device("cpu"), tmp_path / "run", ListSink(),
                      log=lambda m: None)
    trainer.model.load_pretrained_backbones(progress=False)
    proj = trainer.model.encoders["image"].stem.proj.weight.detach().clone()
    assert trainer.fit() == "finished"
    losses = trainer.sink.series("loss")
    assert len(losses) == 2 * trainer.steps_per_epoch and np.isfinite(losses).all()
    assert trainer.sink.series("test/mean_r1")
    assert not torch.equal(proj, trainer.model.encoders["image"].stem.proj.weight)
    # the checkpoint carries the pretrained, untouched backbone: queries need no weights file
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    for modality, path in (("image", weights.image), ("audio", weights.audio)):
        prefix = f"encoders.{modality}.stem.backbone.net."
        stored = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        saved = torch.load(path)
        assert stored and all(torch.equal(v, saved[k]) for k, v in stored.items()), modality
    frozen = {id(p) for b in trainer.model.backbones().values() for p in b.parameters()}
    assert [level.name for level in trainer.optimizer.levels] == ["fast", "mid", "slow"]
    assert not frozen & {id(p) for level in trainer.optimizer.levels for p in level.params}

    searcher = Searcher(tmp_path / "run" / "checkpoints" / "last.pt", device="cpu")
    model = searcher.loaded.model
    image_row = int(cache.split_images("test")[0])
    caption_row = int(cache.split_audio_captions("test")[0])
    _, from_file = searcher.encode_query(image=cache.image_path(image_row))
    _, from_clip = searcher.encode_query(audio=cache.wav_path(caption_row))
    features = cache.features["audio"]
    start, n = features.offsets[caption_row], features.lengths[caption_row]
    with torch.no_grad():
        from_cache = model.encode("image", torch.from_numpy(
            cache.features["image"].values[image_row:image_row + 1].astype(np.float32)))
        from_frames = model.encode("audio", torch.from_numpy(
            features.values[start:start + n].astype(np.float32))[None])
    assert float(from_file @ from_cache.T) > 0.999 and float(from_clip @ from_frames.T) > 0.999
    hits = searcher.query(image=cache.image_path(image_row), target="text", k=3)
    assert len(hits) == 3 and all(hit.modality == "text" for hit in hits)


def test_building_a_trainer_reads_no_weights_and_builds_no_features(small_synth, weights,
                                                                    tmp_path, monkeypatch):
    """Loading pretrained weights and building feature caches are the caller's explicit steps
    (the worker's setup), never a side effect of constructing the Trainer or its optimizer."""
    def io(*args, **kwargs):
        raise AssertionError("the Trainer's construction did I/O")

    monkeypatch.setattr(Backbone, "load_pretrained", io)
    monkeypatch.setattr(backbone_features, "ensure_features", io)
    cfg = backbone_cfg(weights)
    cache = prepare(small_synth, cfg.data, cfg.vocab_size, workers=1, progress=False)
    trainer = Trainer(cfg, cache, torch.device("cpu"), tmp_path / "run", ListSink(),
                      log=lambda m: None)
    assert set(trainer.model.backbones()) == {"image", "audio"} and not trainer.cache.features


def test_unfrozen_backbones_train_in_their_own_level_on_raw_input(small_synth, weights):
    cfg = backbone_cfg(weights, "encoders.image.frozen=false", "encoders.audio.frozen=false",
                       "encoders.image.lr_scale=0.25", "train.lr=4e-3")
    cache = prepare(small_synth, cfg.data, cfg.vocab_size, workers=1, progress=False,
                    encoders=cfg.encoders)
    assert set(cache.features) == {"audio"} and cache.features["audio"].kind == "waveform"
    batch = next(iter(TrainLoader(cache, "train", 4, seed=0, crop=True, flip=True)))
    assert batch["image"].shape == (4, 3, 64, 64)
    row = int(batch["caption_ids"][0])
    clip = load_clip(cache.wav_path(row), cache.data_cfg)
    length = int(batch["audio_mask"][0].sum())
    assert length == len(clip) and batch["audio"].dtype == torch.float32
    np.testing.assert_allclose(batch["audio"][0, :length].numpy(), clip, atol=1 / PCM_SCALE)

    model = NLMM(cfg)
    model.load_pretrained_backbones(progress=False)
    optimizer = model.configure_optimizers(cfg)
    lrs = optimizer.lrs()
    assert lrs["backbone_image"] == pytest.approx(4e-3 * 0.25)
    assert lrs["backbone_audio"] == pytest.approx(4e-3 * 0.1)
    image_params = dict(model.backbones()["image"].named_parameters())
    level = next(lv for lv in optimizer.levels if lv.name == "backbone_image")
    assert {id(p) for p in level.params} == {id(p) for p in image_params.values()}
    before = image_params["net.conv1.weight"].detach().clone()
    model.train()
    forward, _ = model(batch)
    ContrastiveLoss.from_config(cfg)(forward)["loss"].backward()
    assert "backbone_image" in optimizer.step_all(1)
    assert not torch.equal(before, image_params["net.conv1.weight"])
    with pytest.raises(NlmmError, match=r"audio must be \(batch, samples\) 16 kHz waveforms or "
                                        r"\(batch, frames, 64\) wav2vec2_tiny features"):
        model.encode("audio", torch.zeros(1, 1, 80, 50))
