"""The diffusers integration on a tiny pipeline built from configs, offline, on the CPU: guard() checks the
outputs (a regenerated known image comes back black and flagged, with its results) and reads the
memorization signal from the pipeline's own CFG batch; ProvenanceSafetyChecker in the safety_checker slot."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers integration's tests need diffusers (pip install '.[dev]')")
pytest.importorskip("transformers", reason="the tiny pipeline's text encoder needs transformers")
try:
    from diffusers import StableDiffusionPipeline  # noqa: F401
except (ImportError, RuntimeError) as exc:  # this diffusers needs a newer transformers than installed
    pytest.skip(f"diffusers cannot load StableDiffusionPipeline here ({str(exc).splitlines()[-1][:160]})",
                allow_module_level=True)

from tiny_pipeline import pipeline  # noqa: E402
from provenance_guard.core.policy import Policy  # noqa: E402
from provenance_guard.integrations.diffusers import (GuardedPipeline, ProvenanceSafetyChecker, _CfgReader,  # noqa: E402
                                                     guard, use_safety_checker)

CALL = dict(num_inference_steps=3, height=16, width=16, guidance_scale=7.0)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return pipeline(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def known(pipe, tmp_path_factory, tiny_model, references):
    """A bundle holding the scikit-image references and one image the pipeline makes for seed 11."""
    import shutil

    from PIL import Image

    from provenance_guard.index_builder.images import build_from_images

    out = pipe("a lighthouse at night", generator=torch.Generator().manual_seed(11), output_type="np", **CALL)
    folder = tmp_path_factory.mktemp("known-refs")
    for f in references.iterdir():
        shutil.copy(f, folder / f.name)
    Image.fromarray((out.images[0] * 255).astype(np.uint8)).save(folder / "generated-before.png")
    bundle = tmp_path_factory.mktemp("bundles") / "known"
    build_from_images(folder, bundle, tiny_model, warn=0.985, block=0.995, progress=False)
    return bundle


def test_guard_blacks_out_a_regenerated_known_image_and_reports(pipe, known):
    guarded = guard(pipe, str(known), Policy(verify="confirm+escalate"), device="cpu")
    try:
        out = guarded("a lighthouse at night", generator=torch.Generator().manual_seed(11), output_type="np", **CALL)
        (result,) = out.provenance
        assert out.provenance_flagged == [True] and result.verdict == "block"
        assert result.top.url == "generated-before.png" and not out.images[0].any()  # black, as the safety checker
        assert result.generation.prompt == "a lighthouse at night" and result.generation.source == "diffusers"
        prompt = result.prompt
        assert prompt.steps == 3 and prompt.memorization_score > 0 and prompt.verdict == "unrated"
        other = guarded("a red bicycle", generator=torch.Generator().manual_seed(5), output_type="pil", **CALL)
        assert other.provenance_flagged == [False] and other.images[0].getextrema() != ((0, 0), (0, 0), (0, 0))
        # Without CFG there is no unconditional prediction: the signal is unavailable, never 0.
        plain = guarded("a red bicycle", generator=torch.Generator().manual_seed(5), output_type="np",
                        **{**CALL, "guidance_scale": 1.0})
        assert plain.provenance[0].prompt.verdict == "unavailable" and plain.provenance[0].prompt.memorization_score is None
    finally:
        guarded.remove()


def test_the_cfg_batch_is_read_as_diffusers_orders_it():
    """[unconditional, conditional] halves; v-prediction is converted with the scheduler's alphas."""
    alphas = torch.linspace(0.99, 0.01, 1000)
    fake = types.SimpleNamespace(do_classifier_free_guidance=True, scheduler=types.SimpleNamespace(
        config=types.SimpleNamespace(prediction_type="epsilon"), alphas_cumprod=alphas))
    reader = _CfgReader(fake, steps=1)
    reader.active = True
    uncond, cond = torch.zeros(2, 4, 4, 4), torch.ones(2, 4, 4, 4) * 3
    reader(None, (torch.zeros(4, 4, 4, 4), torch.tensor(500)), {}, (torch.cat([uncond, cond]),))
    assert [s.score for s in reader.monitor.scores()] == pytest.approx([3.0, 3.0])
    fake.scheduler.config.prediction_type = "v_prediction"
    reader = _CfgReader(fake, steps=1)
    reader.active = True
    reader(None, (torch.zeros(4, 4, 4, 4), torch.tensor(500)), {}, types.SimpleNamespace(sample=torch.cat([uncond, cond])))
    assert reader.monitor.scores()[0].score == pytest.approx(3.0 * float(alphas[500].sqrt()), rel=1e-5)


def test_the_safety_checker_slot(pipe, known):
    checker = ProvenanceSafetyChecker(str(known), device="cpu")
    use_safety_checker(pipe, checker)
    try:
        out = pipe("a lighthouse at night", generator=torch.Generator().manual_seed(11), output_type="np", **CALL)
        assert out.nsfw_content_detected == [True] and not out.images[0].any()
        assert checker.last_results[0].verdict == "block" and checker.last_results[0].top.url == "generated-before.png"
        out = pipe("a red bicycle", generator=torch.Generator().manual_seed(5), output_type="np", **CALL)
        assert out.nsfw_content_detected == [False] and out.images[0].any()
    finally:
        pipe.safety_checker = None


def test_guard_refuses_a_pipeline_without_a_denoiser(known):
    from provenance_guard.core.errors import ConfigError

    with pytest.raises(ConfigError, match="neither a unet nor a transformer"):
        GuardedPipeline(types.SimpleNamespace(), str(known))


def test_guard_with_credentials_saves_signed_images_whose_manifest_says_their_own_verdict(pipe, known, tmp_path):
    """guard(pipe, credentials=DIR): output.save_with_credentials(i, path) saves and signs; the manifest's
    check assertion is the image's own (a blocked image's says block, never pass); bad keys fail at guard()."""
    pytest.importorskip("c2pa", reason="Content Credentials need c2pa-python (pip install '.[c2pa]')")
    from provenance_guard.core import credentials as cr

    keys = tmp_path / "keys"
    cr.init_credentials(keys)
    guarded = guard(pipe, str(known), Policy(verify="confirm+escalate"), device="cpu", credentials=str(keys))
    try:
        ok = guarded("a red bicycle", generator=torch.Generator().manual_seed(5), output_type="pil", **CALL)
        path = ok.save_with_credentials(0, tmp_path / "bicycle.png")
        status = cr.verify_file(path, (keys / "root.pem").read_bytes())
        assert status.state == "trusted" and status.check["verdict"] == ok.provenance[0].verdict == "pass"
        assert status.generation["prompt"] == "a red bicycle" and status.generation["steps"] == 3
        blocked = guarded("a lighthouse at night", generator=torch.Generator().manual_seed(11), output_type="pil",
                          **CALL)
        path = blocked.save_with_credentials(0, tmp_path / "lighthouse.jpg")
        assert cr.verify_file(path).check["verdict"] == "block"
    finally:
        guarded.remove()
    with pytest.raises(cr.CredentialsError, match="credentials init"):
        guard(pipe, str(known), credentials=str(tmp_path / "missing"))
