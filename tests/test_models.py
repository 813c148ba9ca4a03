"""Model specs and loading through the user's paths: local-dir, ARCH//file (.safetensors/.pt), tags offline."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from provenance_guard.core.embed import Embedder, clear_embedders, get_embedder
from provenance_guard.core.errors import ConfigError, ModelLoadError
from provenance_guard.core.models import ModelSpec, build_model
from provenance_guard.demo import sample_image, tiny_model_cfg


@pytest.mark.parametrize("raw,kind,arch,source", [
    ("ViT-L-14/openai", "tag", "ViT-L-14", "openai"),
    ("ViT-H-14/laion2b_s32b_b79k", "tag", "ViT-H-14", "laion2b_s32b_b79k"),
    ("ViT-B-32//models/b32.safetensors", "file", "ViT-B-32", "/models/b32.safetensors"),
    ("ViT-B-32/./weights/b32.pt", "file", "ViT-B-32", "weights/b32.pt"),
    ("ViT-B-32/b32.bin", "file", "ViT-B-32", "b32.bin"),
    ("hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "hf-hub", None, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    ("local-dir:/srv/clip", "local-dir", None, "/srv/clip"),
])
def test_spec_parsing(raw, kind, arch, source):
    spec = ModelSpec.parse(raw)
    assert (spec.kind, spec.arch, spec.source) == (kind, arch, source)
    assert str(spec) == raw


@pytest.mark.parametrize("raw", ["", "ViT-L-14", "hf-hub:", "local-dir:  "])
def test_spec_without_weights_is_refused(raw):
    with pytest.raises(ConfigError):
        ModelSpec.parse(raw)


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    """Register the tiny config as an open_clip architecture, as a user's custom config would be."""
    import open_clip

    folder = tmp_path_factory.mktemp("arch")
    (folder / "pg-tiny-test.json").write_text(json.dumps(tiny_model_cfg()))
    open_clip.add_model_config(folder / "pg-tiny-test.json")
    torch.manual_seed(1)
    model = open_clip.model.CLIP(**tiny_model_cfg())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    from safetensors.torch import save_file

    save_file(state, str(folder / "w.safetensors"))
    torch.save(state, folder / "w.pt")
    return "pg-tiny-test", folder, model.eval()


def test_local_dir_model_loads_and_embeds_unit_vectors(tiny_model):
    emb = get_embedder(tiny_model, "cpu")
    assert isinstance(emb, Embedder) and emb.dim == 64 and emb.device == "cpu"
    vecs = emb.embed([sample_image("astronaut"), sample_image("coffee")])
    assert vecs.dtype == np.float32 and vecs.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert get_embedder(tiny_model, "cpu") is emb  # loaded once per process


@pytest.mark.parametrize("fname", ["w.safetensors", "w.pt"])
def test_arch_with_local_checkpoint_file(tiny_arch, fname):
    arch, folder, reference = tiny_arch
    model, pre = build_model(ModelSpec.parse(f"{arch}/{folder / fname}"), "cpu", "fp32")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), reference.encode_image(x))
    assert pre["size"] == (64, 64)


def test_pickle_checkpoint_is_refused_not_executed(tiny_arch, tmp_path):
    arch, _, _ = tiny_arch

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload()}, evil)
    with pytest.raises(ModelLoadError):
        build_model(ModelSpec.parse(f"{arch}/{evil}"), "cpu", "fp32")
    assert not (tmp_path / "pwned").exists()


def test_missing_and_wrong_files(tiny_arch, tmp_path):
    arch, folder, _ = tiny_arch
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_model(ModelSpec.parse(f"{arch}/{tmp_path / 'nope.safetensors'}"), "cpu", "fp32")
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        build_model(ModelSpec.parse(f"No-Such-Arch/{folder / 'w.pt'}"), "cpu", "fp32")
    with pytest.raises(ModelLoadError, match="belongs to that architecture"):
        build_model(ModelSpec.parse(f"RN50/{folder / 'w.safetensors'}"), "cpu", "fp32")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="open_clip_config.json is missing"):
        build_model(ModelSpec.parse(f"local-dir:{empty}"), "cpu", "fp32")
    (empty / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_model_cfg()}))
    with pytest.raises(ModelLoadError, match="holds no weights"):
        build_model(ModelSpec.parse(f"local-dir:{empty}"), "cpu", "fp32")


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ConfigError, match="known tags: .*openai"):
        build_model(ModelSpec.parse("ViT-B-32/no-such-tag"), "cpu", "fp32")


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(c, "HUGGINGFACE_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_download(*a, **k):  # the slow path (~46 s offline) must never be entered
        raise AssertionError("hf_hub_download was called although the host is unreachable")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_download)


def test_offline_tag_fails_fast_with_how_to(empty_hf_cache, monkeypatch):
    # The endpoint is a closed port on loopback: the probe is refused at once, nothing leaves the machine.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelLoadError) as info:
        build_model(ModelSpec.parse("ViT-B-32/openai"), "cpu", "fp32")
    msg = str(info.value)
    assert "could not be fetched" in msg and "127.0.0.1:9 cannot be reached" in msg
    # an OpenAI checkpoint as a file needs the QuickGELU architecture (ViT-B-32 alone builds GELU: wrong)
    assert "ViT-B-32-quickgelu//path/to/weights.safetensors" in msg and "local-dir:" in msg and "--model" in msg
    assert "Hugging Face cache (HF_HOME)" in msg and "model_override" in msg  # what the hosts offer


def test_hf_hub_offline_env_skips_the_probe(empty_hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("provenance_guard.core.models._probe",
                        lambda url: pytest.fail("no probe may be made with HF_HUB_OFFLINE=1"))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        build_model(ModelSpec.parse("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"), "cpu", "fp32")


def test_tensor_and_pil_give_the_same_embedding(tiny_model):
    """ComfyUI's IMAGE tensor and the PIL image it came from embed alike: both reach the model as the same
    8-bit pixels, so the only difference left is float summation order (tolerance 1e-5)."""
    emb = get_embedder(tiny_model, "cpu")
    pil = sample_image("chelsea").convert("RGB")
    tensor = torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0)[None]
    a = emb.embed([pil])[0]
    b = emb.embed(tensor)[0]
    assert float(a @ b) > 1 - 1e-6
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_close_to_open_clip_own_preprocessing(tiny_model):
    """Our tensor preprocessing gives open_clip's own transform's tensors (Pillow resize, centre crop,
    normalisation) on real photos of every aspect: the resamplers (torch's antialiased bicubic, Pillow's)
    round a value to a neighbouring 8-bit level at most, and only a few in a thousand values do."""
    import open_clip

    from provenance_guard.core.images import to_pixels

    emb = get_embedder(tiny_model, "cpu")
    cfg = emb.preprocess_cfg
    assert (cfg["interpolation"], cfg["resize_mode"]) == ("bicubic", "shortest")  # open_clip's defaults
    transform = open_clip.image_transform(emb.size, is_train=False, mean=cfg["mean"], std=cfg["std"])
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    for name in ("astronaut", "chelsea", "coffee", "rocket"):  # square, and landscapes of 3:2 and wider
        pil = sample_image(name).convert("RGB")
        ours, ref = emb.preprocess(to_pixels([pil]))[0], transform(pil)
        assert ours.shape == ref.shape == (3, *emb.size)
        levels = (ours - ref).abs() * std * 255  # the difference in 8-bit levels of the resized pixels
        assert float(levels.max()) < 1.001, name
        assert float((levels > 0.5).float().mean()) < 0.005, name


def test_architecture_configs_are_registered_through_open_clip_add_model_config(monkeypatch):
    """An architecture config reaches open_clip through its public add_model_config, under a name made from
    the config's hash: the same config is registered once, another gets another name; the file it read is
    gone; a config open_clip would skip is a ModelLoadError that says what it lacks."""
    import open_clip

    from provenance_guard.core import models

    real, paths = open_clip.add_model_config, []
    monkeypatch.setattr(open_clip, "add_model_config", lambda path: (paths.append(path), real(path)))
    cfg = tiny_model_cfg()
    cfg["embed_dim"] = 40  # a config no other test registers
    first = models._construct(cfg, False, "cpu", "fp32")
    again = models._construct(json.loads(json.dumps(cfg)), False, "cpu", "fp32")
    other = models._construct(dict(cfg, embed_dim=24), False, "cpu", "fp32")
    assert first.provenance_guard_arch == again.provenance_guard_arch != other.provenance_guard_arch
    assert len(paths) == 2 and not any(p.exists() for p in paths)
    assert open_clip.get_model_config(first.provenance_guard_arch) == cfg
    assert first.text_projection.shape[-1] == 40 and other.text_projection.shape[-1] == 24
    with pytest.raises(ModelLoadError, match="has no vision_cfg, text_cfg"):
        models._construct({"embed_dim": 8}, False, "cpu", "fp32")


def test_embed_text_in_same_space(tiny_model):
    emb = get_embedder(tiny_model, "cpu")
    t = emb.embed_text(["a cat", "a rocket"])
    assert t.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)


def test_clear_embedders_reloads(tiny_model):
    a = get_embedder(tiny_model, "cpu")
    clear_embedders()
    assert get_embedder(tiny_model, "cpu") is not a
