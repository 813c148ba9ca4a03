"""The prompt side: the memorization monitor against hand-computed values (eps and x0 forms agree), each
host's hook with its real call shapes (ComfyUI's post-CFG args, A1111's CFGDenoisedParams layout with AND and
skip_uncond, Forge's patcher), no CFG -> unavailable, the prompt verdict in results, the caption index
through build, remove, append and merge, and bench/q2_memorization.py (its statistics; a seconds-long run on
the toy and on a saved diffusers pipeline)."""
from __future__ import annotations

import json
import re
import sys
import types

import numpy as np
import pytest
import torch

from provenance_guard.core.memorization import (FLAG, PASS, UNAVAILABLE, UNRATED, MemorizationMonitor,
                                                MemorizationScore, prompt_check)
from provenance_guard.core.policy import Policy
from provenance_guard.demo import sample_image


def test_the_monitor_averages_the_rms_of_the_cfg_difference_over_the_first_steps():
    monitor = MemorizationMonitor(steps=2)
    eps_c = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # [B=2, 1, 2, 2]
    eps_u = torch.zeros_like(eps_c)
    monitor.add_eps(eps_c, eps_u)                    # rms: sqrt((1+4+9+16)/4) = 2.7386, 0
    monitor.add_eps(eps_c * 2, eps_u)                # 5.4772, 0
    monitor.add_eps(eps_c * 100, eps_u)              # past the first 2 steps: ignored
    a, b = monitor.scores()
    assert a.steps == 2 and a.score == pytest.approx((np.sqrt(7.5) + 2 * np.sqrt(7.5)) / 2)
    assert b.score == 0.0


def test_eps_and_denoised_forms_agree():
    """D = x - sigma * eps, so (D_u - D_c) / sigma = eps_c - eps_u, for each image's own sigma."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    eps_c, eps_u = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    sigma = torch.tensor([14.6, 3.2, 0.7])
    d_c, d_u = x - sigma[:, None, None, None] * eps_c, x - sigma[:, None, None, None] * eps_u
    by_eps, by_x0 = MemorizationMonitor(1), MemorizationMonitor(1)
    by_eps.add_eps(eps_c, eps_u)
    by_x0.add_denoised(x, d_c, d_u, sigma)
    for a, b in zip(by_eps.scores(), by_x0.scores(), strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-5)


def test_no_cfg_is_unavailable_never_zero_and_skipped_steps_do_not_count():
    monitor = MemorizationMonitor(3)
    monitor.no_guidance()
    (s,) = monitor.scores(1)
    assert s.score is None and "guidance" in s.reason
    check = prompt_check(s, "sd1")
    assert check.verdict == UNAVAILABLE and check.memorization_score is None
    skipped = MemorizationMonitor(3)
    skipped.skip()
    (s,) = skipped.scores(1)
    assert s.score is None and "skipped" in s.reason


def test_prompt_verdicts_by_family_threshold():
    assert prompt_check(MemorizationScore(0.9, 5), "sd1", {"sd1": 0.5}).verdict == FLAG
    assert prompt_check(MemorizationScore(0.1, 5), "sd1", {"sd1": 0.5}).verdict == PASS
    unrated = prompt_check(MemorizationScore(0.9, 5), "sd1")
    assert unrated.verdict == UNRATED and "not measured" in unrated.reason and unrated.memorization_score == 0.9


# hosts ---------------------------------------------------------------------------------------------------------

class FakePatcher:
    """comfy.model_patcher.ModelPatcher / Forge's UnetPatcher as far as the hook uses it."""

    def __init__(self, config="SD15"):
        self.model = types.SimpleNamespace(model_config=type(config, (), {})())
        self.post_cfg = []

    def clone(self):
        other = FakePatcher(type(self.model.model_config).__name__)
        other.post_cfg = list(self.post_cfg)
        return other

    def set_model_sampler_post_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.post_cfg.append(fn)


def comfy_step(patcher, x, eps_c, eps_u, sigma, cond_scale=7.0, uncond=True):
    """What comfy/samplers.py hands each post-CFG function (samplers.py:360-375 at v0.3.64)."""
    s = sigma[:, None, None, None]
    cond_denoised, uncond_denoised = x - s * eps_c, x - s * eps_u if uncond else torch.zeros_like(x)
    args = {"denoised": uncond_denoised + (cond_denoised - uncond_denoised) * cond_scale, "cond": [object()],
            "uncond": [object()] if uncond else None, "cond_scale": cond_scale, "model": object(),
            "uncond_denoised": uncond_denoised, "cond_denoised": cond_denoised, "sigma": sigma, "model_options": {},
            "input": x}
    for fn in patcher.post_cfg:
        assert fn(args) is args["denoised"]


def test_comfyui_node_feeds_the_check_of_the_same_run(monkeypatch, built_bundle):
    from provenance_guard.comfyui_nodes import nodes_memorization as nm
    from provenance_guard.core.check import Checker

    context = types.SimpleNamespace(prompt_id="run-1", node_id="3")
    utils = types.ModuleType("comfy_execution.utils")
    utils.get_executing_context = lambda: context
    monkeypatch.setitem(sys.modules, "comfy_execution", types.ModuleType("comfy_execution"))
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", utils)
    (patched,) = nm.MemorizationMonitor().patch(FakePatcher("SDXL"), steps=2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    eps_c = torch.randn(2, 4, 8, 8, generator=gen)
    for sigma in (14.6, 9.0):
        comfy_step(patched, x, eps_c, torch.zeros_like(eps_c), torch.full((2,), sigma))
    monitor = nm.RUNS.get("run-1:3")
    scores = monitor.scores(2)
    expected = eps_c.flatten(1).pow(2).mean(1).sqrt()
    assert [s.score for s in scores] == pytest.approx(expected.tolist(), rel=1e-5) and monitor.family == "sdxl"
    # CFG 1: ComfyUI computes no uncond (uncond None): unavailable, never 0.
    context.prompt_id = "run-2"
    comfy_step(patched, x, eps_c, eps_c, torch.full((2,), 5.0), cond_scale=1.0, uncond=False)
    assert nm.RUNS.get("run-2:3").scores(2)[0].score is None
    # The check reads the run's scores and the result carries them (threshold from the policy).
    from provenance_guard.comfyui_nodes.nodes_provenance import sampler_signals
    from provenance_guard.core.result import GenerationRecord

    context.prompt_id = "run-1"
    signals, family = sampler_signals(GenerationRecord(prompt="astronaut", extra={"sampler_node": "3"}), 2)
    results = Checker(built_bundle, device="cpu").check(
        [sample_image("camera")] * 2, records=[GenerationRecord(prompt="astronaut")] * 2, signals=signals,
        family=family, policy=Policy(memorization_thresholds={"sdxl": float(expected.min()) - 1e-3}))
    assert results[0].prompt.verdict == FLAG and results[0].prompt.family == "sdxl"
    assert results[0].verdict == "warn" and any("memorization signal" in w for w in results[0].warnings)
    assert json.loads(results[0].dumps())["prompt"]["memorization_score"] == pytest.approx(expected[0].item(), rel=1e-5)


def test_the_comfyui_monitor_threshold_input_judges_the_score_in_the_node(monkeypatch, built_bundle):
    """The Monitor node's threshold (0: the bundle's or the table's) reaches the Provenance Check of the same
    run: the score is flagged against it and shows in the node's report; a bad value is refused."""
    from provenance_guard.comfyui_nodes import nodes_memorization as nm
    from provenance_guard.comfyui_nodes.nodes_provenance import ProvenanceCheck
    from provenance_guard.core.errors import ConfigError

    assert "threshold" in nm.MemorizationMonitor.INPUT_TYPES()["optional"]
    context = types.SimpleNamespace(prompt_id="run-t", node_id="3")
    utils = types.ModuleType("comfy_execution.utils")
    utils.get_executing_context = lambda: context
    monkeypatch.setitem(sys.modules, "comfy_execution", types.ModuleType("comfy_execution"))
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", utils)
    with pytest.raises(ConfigError, match="give a number >= 0"):
        nm.MemorizationMonitor().patch(FakePatcher("SD15"), steps=2, threshold=-1.0)
    (patched,) = nm.MemorizationMonitor().patch(FakePatcher("SD15"), steps=2, threshold=0.001)
    gen = torch.Generator().manual_seed(2)
    x, eps_c = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    for sigma in (14.6, 9.0):
        comfy_step(patched, x, eps_c, torch.zeros_like(eps_c), torch.full((1,), sigma))
    assert nm.RUNS.get("run-t:3").threshold == 0.001
    prompt = {"3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
                                                         "scheduler": "normal", "denoise": 1.0}},
              "9": {"class_type": "ProvenanceCheck", "inputs": {"images": ["3", 0]}}}
    images = torch.from_numpy(np.asarray(sample_image("camera").convert("RGB").resize((64, 64)),
                                         dtype=np.float32)[None] / 255.0)
    node = ProvenanceCheck()
    out = node.check(images, bundle="", bundle_path=str(built_bundle), on_match="warn", fail_mode="open",
                     use_bundle_thresholds=True, warn=0.9, block=0.95, top_k=3, prompt=prompt, unique_id="9")
    report = out["result"][3]
    assert re.search(r"memorization 1\.00\d\d flag \(threshold 0\.0010, sd1\)", report), report


def forge_step(patcher, x, eps_c, eps_u, sigma, cond_scale=7.0):
    """What Forge's backend/sampling/sampling_function.py hands each post-CFG function: no cond_scale; at a
    step run without guidance (CFG 1, Skip Early CFG) the unconditional prediction is zeros, uncond present."""
    s = sigma[:, None, None, None]
    cond_denoised = x - s * eps_c
    uncond_denoised = x - s * eps_u if cond_scale != 1.0 else torch.zeros_like(x)
    args = {"denoised": uncond_denoised + (cond_denoised - uncond_denoised) * cond_scale, "cond": [object()],
            "uncond": [object()], "model": object(), "uncond_denoised": uncond_denoised,
            "cond_denoised": cond_denoised, "sigma": sigma, "model_options": {}, "input": x}
    for fn in patcher.post_cfg:
        assert fn(args) is args["denoised"]


def a1111_step(glue, p, x, conds_per_image, eps_c, eps_u, sigma, timesteps=False, skip_uncond=False, step=0):
    """modules/sd_samplers_cfg_denoiser.py: x_in = each image's rows (one per AND part) then one uncond row
    per image; the denoiser callback first, then x_out to the denoised callback. skip_uncond: the webui's
    Skip Early CFG setting covers this step, and the uncond rows are copies of the cond ones."""
    b = x.shape[0]
    rows = lambda t: torch.cat([t[i:i + 1].repeat(conds_per_image, *[1] * (t.dim() - 1)) for i in range(b)])
    x_in, sigma_in = torch.cat([rows(x), x]), torch.cat([rows(sigma), sigma])
    denoiser = type("CFGDenoiserTimesteps" if timesteps else "CFGDenoiserKDiffusion", (), {})()
    denoiser.p, denoiser.step, denoiser.total_steps = p, step, 20
    sys.modules["modules.shared"].opts.skip_early_cond = 0.25 if skip_uncond else 0.0
    glue.cfg_denoiser(types.SimpleNamespace(x=x_in, sigma=sigma_in, text_uncond=torch.zeros(b, 77, 768),
                                            denoiser=denoiser))
    s = sigma[:, None, None, None]
    if timesteps:
        cond_out, uncond_out = eps_c, eps_u
    else:
        cond_out, uncond_out = x - s * eps_c, x - s * eps_u
    x_out = torch.cat([rows(cond_out), rows(cond_out)[::conds_per_image] if skip_uncond else uncond_out])
    glue.cfg_denoised(types.SimpleNamespace(x=x_out, sampling_step=0, total_sampling_steps=20, inner_model=None))


@pytest.mark.parametrize("conds,timesteps", [(1, False), (2, False), (1, True)], ids=["plain", "AND", "ddim"])
def test_a1111_cfg_callbacks_read_the_webui_layout(monkeypatch, conds, timesteps):
    fake_scripts = types.ModuleType("modules.scripts")
    fake_scripts.Script = object
    fake_scripts.AlwaysVisible = object()
    shared = types.ModuleType("modules.shared")
    shared.opts = types.SimpleNamespace(skip_early_cond=0.0, s_min_uncond_all=False)
    modules = types.ModuleType("modules")
    modules.shared = shared
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    monkeypatch.setitem(sys.modules, "modules.scripts", fake_scripts)
    monkeypatch.delitem(sys.modules, "provenance_guard.a1111_extension.script", raising=False)
    from provenance_guard.a1111_extension import script as glue

    state = glue.RunState(action="warn", policy=Policy())
    state.monitor = MemorizationMonitor(3)
    p = types.SimpleNamespace(_provenance=state)
    gen = torch.Generator().manual_seed(2)
    x, eps_c, eps_u = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    for sigma in (14.6, 7.0, 3.0, 1.0):
        a1111_step(glue, p, x, conds, eps_c, eps_u, torch.full((2,), sigma), timesteps)
    expected = (eps_c - eps_u).flatten(1).pow(2).mean(1).sqrt()
    assert [s.score for s in state.monitor.scores(2)] == pytest.approx(expected.tolist(), rel=1e-4)
    assert state.monitor.scores(2)[0].steps == 3
    # Skip Early CFG: the uncond rows are copies of the cond ones; such a step is not counted, and says so.
    state.monitor = MemorizationMonitor(3)
    a1111_step(glue, p, x, conds, eps_c, eps_u, torch.full((2,), 5.0), timesteps, skip_uncond=True)
    assert state.monitor.scores(2)[0].score is None and "skipped" in state.monitor.scores(2)[0].reason
    # A UNet whose output ignores the prompt (cond equal to uncond, as a random checkpoint gives): a real
    # difference of 0, counted, never reported as a skipped unconditional prediction.
    state.monitor = MemorizationMonitor(2)
    for sigma in (14.6, 7.0):
        a1111_step(glue, p, x, conds, eps_c, eps_c, torch.full((2,), sigma), timesteps)
    assert [s.score for s in state.monitor.scores(2)] == [0.0, 0.0] and state.monitor.scores(2)[0].steps == 2
    # NGMS: odd steps below s_min_uncond skip the unconditional prediction.
    p.s_min_uncond = 6.0
    state.monitor = MemorizationMonitor(2)
    a1111_step(glue, p, x, conds, eps_c, eps_u, torch.full((2,), 5.0), timesteps, step=1)
    a1111_step(glue, p, x, conds, eps_c, eps_u, torch.full((2,), 5.0), timesteps, step=2)
    assert state.monitor.scores(2)[0].steps == 1
    # Forge at CFG 1 hands the callback no unconditional prompt (p.uc = None): nothing to read, no error.
    state.monitor = MemorizationMonitor(2)
    state.monitor.no_guidance()
    denoiser = type("CFGDenoiserKDiffusion", (), {"p": p, "step": 0, "total_steps": 20})()
    glue.cfg_denoiser(types.SimpleNamespace(x=x, sigma=torch.full((2,), 5.0), text_uncond=None, denoiser=denoiser))
    assert state.monitor.scores(2)[0].score is None and "without classifier-free" in state.monitor.scores(2)[0].reason


@pytest.mark.parametrize("cfg", [7.0, 1.0])
def test_forge_patcher_gets_the_post_cfg_function(monkeypatch, cfg):
    fake_scripts = types.ModuleType("modules.scripts")
    fake_scripts.Script = object
    fake_scripts.AlwaysVisible = object()
    monkeypatch.setitem(sys.modules, "modules", types.ModuleType("modules"))
    monkeypatch.setitem(sys.modules, "modules.scripts", fake_scripts)
    monkeypatch.delitem(sys.modules, "provenance_guard.a1111_extension.script", raising=False)
    from provenance_guard.a1111_extension import script as glue

    state = glue.RunState(action="warn", policy=Policy())
    state.monitor = MemorizationMonitor(2)
    unet = FakePatcher("SD15")
    p = types.SimpleNamespace(_provenance=state, cfg_scale=cfg, sd_model=types.SimpleNamespace(
        forge_objects=types.SimpleNamespace(unet=unet)))
    glue.ProvenanceGuardScript.process_before_every_sampling(None, p)
    patched = p.sd_model.forge_objects.unet
    assert patched is not unet and len(patched.post_cfg) == 1 and not unet.post_cfg  # cloned, not mutated
    gen = torch.Generator().manual_seed(3)
    x, eps_c, eps_u = (torch.randn(1, 4, 8, 8, generator=gen) for _ in range(3))
    # Forge's args carry no cond_scale: the guidance is the run's (p.cfg_scale), not "no guidance".
    forge_step(patched, x, eps_c, eps_u, torch.tensor([9.0]), cond_scale=cfg)
    score = state.monitor.scores(1)[0]
    if cfg > 1:
        assert score.score == pytest.approx((eps_c - eps_u).pow(2).mean().sqrt().item(), rel=1e-5)
    else:
        assert score.score is None and "without classifier-free guidance" in score.reason
    # A step the webui ran without guidance (Skip Early CFG, told by on_cfg_denoiser) is not counted.
    state.monitor = MemorizationMonitor(2)
    glue._PENDING.guidance = (cfg, True)
    forge_step(patched, x, eps_c, eps_u, torch.tensor([9.0]), cond_scale=1.0)
    assert state.monitor.scores(1)[0].score is None
    assert ("skipped" in state.monitor.scores(1)[0].reason) == (cfg > 1)


def test_post_cfg_rule_is_one_for_every_host():
    from provenance_guard.core.memorization import post_cfg_step

    x = torch.ones(1, 4, 2, 2)
    args = {"input": x, "cond_denoised": x * 0.5, "uncond_denoised": x * 0.5, "sigma": torch.tensor([2.0]),
            "uncond": [object()], "cond_scale": 7.0}
    monitor = MemorizationMonitor(1)
    post_cfg_step(monitor, args)  # equal predictions: a difference of 0, counted
    assert monitor.scores(1)[0].score == 0.0 and monitor.scores(1)[0].steps == 1
    monitor = MemorizationMonitor(1)
    post_cfg_step(monitor, dict(args, cond_scale=1.0))
    assert monitor.scores(1)[0].score is None and "without classifier-free" in monitor.scores(1)[0].reason
    monitor = MemorizationMonitor(1)
    post_cfg_step(monitor, dict(args, uncond=None))  # guided run, this step without its uncond pass
    assert monitor.scores(1)[0].score is None and "skipped" in monitor.scores(1)[0].reason
    monitor = MemorizationMonitor(1)
    post_cfg_step(monitor, {k: v for k, v in args.items() if k != "cond_scale"}, cfg_scale=7.0)  # Forge's args
    assert monitor.scores(1)[0].score == 0.0


# the caption index --------------------------------------------------------------------------------------------

def test_caption_normalisation():
    from provenance_guard.core.captions import caption_hash, normalise

    assert normalise("  The  Starry Night, by Vincent van Gogh!! ") == "the starry night by vincent van gogh"
    assert caption_hash("THE STARRY NIGHT by Vincent van Gogh") == caption_hash("the starry night, by vincent van gogh")
    assert caption_hash("the starry night") != caption_hash("the starry nights")


@pytest.fixture
def caption_bundle(tmp_path):
    """Rows 0-3 share a caption and are near-duplicate images (a memorization risk); row 4 has the caption
    but another picture; rows 5-9 are unrelated."""
    import pyarrow as pa

    from provenance_guard.core.bundle import BundleWriter

    rng = np.random.default_rng(0)
    base = rng.standard_normal(16).astype(np.float32)
    vecs = np.vstack([base + 0.01 * rng.standard_normal((4, 16)), rng.standard_normal((6, 16))]).astype(np.float32)
    captions = ["Mona Lisa, by Leonardo"] * 5 + [f"photo {i}" for i in range(5)]
    with BundleWriter(tmp_path / "b", model="m/t", dim=16) as w:
        w.add(vecs, pa.table({"url": [f"u{i}" for i in range(10)], "caption": captions}))
        w.finish()
    return tmp_path / "b"


def test_caption_lookup_counts_rows_and_near_duplicates(caption_bundle, capsys):
    from provenance_guard.cli import main as cli
    from provenance_guard.core.bundle import Bundle
    from provenance_guard.core.captions import lookup

    found = lookup(Bundle.open(caption_bundle), "mona lisa by leonardo")
    assert (found.rows, found.near_duplicates) == (5, 4) and found.examples == [0, 1, 2, 3, 4]
    assert lookup(Bundle.open(caption_bundle), "a photo of a dog").rows == 0
    assert cli(["prompt", "Mona Lisa, by Leonardo", "--index", str(caption_bundle)]) == 1
    assert "5 row(s) carry this caption; 4 of them" in capsys.readouterr().out
    assert cli(["prompt", "photo 3", "--index", str(caption_bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bundles"][0]["rows"] == 1


def test_caption_index_follows_remove_append_and_merge(caption_bundle, tmp_path):
    from laion_synth import write_shards
    from provenance_guard.core.bundle import Bundle
    from provenance_guard.core.captions import lookup
    from provenance_guard.index_builder.maintain import append_rows, merge_bundles, remove_rows

    remove_rows(caption_bundle, ids=[0, 1])
    assert lookup(Bundle.open(caption_bundle), "Mona Lisa, by Leonardo").rows == 3
    write_shards(tmp_path / "new", [5], d=16)  # captions "caption <i>N</i>" for rows 0..4 of the shard
    append_rows(caption_bundle, str(tmp_path / "new"))
    b = Bundle.open(caption_bundle)
    found = lookup(b, "caption <i>2</i>")
    assert found.rows == 1 and found.examples == [12]  # appended after the 10 existing rows
    merge_bundles(caption_bundle, caption_bundle, tmp_path / "merged")
    m = Bundle.open(tmp_path / "merged")
    assert lookup(m, "caption <i>2</i>").examples == [12, 27] and lookup(m, "Mona Lisa by Leonardo").rows == 6


def test_an_old_bundle_without_a_caption_index_says_so_and_can_get_one(caption_bundle, capsys):
    import shutil

    from provenance_guard.cli import main as cli
    from provenance_guard.core.bundle import Bundle, finalize, read_manifest

    m = read_manifest(caption_bundle)
    (caption_bundle / m.captions_file).unlink()
    m.captions_file = None
    finalize(caption_bundle, m)
    assert Bundle.open(caption_bundle).captions is None
    assert cli(["prompt", "Mona Lisa", "--index", str(caption_bundle)]) == 0
    assert "no caption index" in capsys.readouterr().out
    assert cli(["index", "captions", str(caption_bundle)]) == 0
    assert cli(["prompt", "Mona Lisa, by Leonardo", "--index", str(caption_bundle)]) == 1
    shutil.rmtree(caption_bundle)


def test_results_carry_the_caption_check_and_the_policy_combines_it(caption_bundle):
    from provenance_guard.core.check import Checker
    from provenance_guard.core.result import GenerationRecord

    checker = Checker(caption_bundle, device="cpu")
    vec = np.random.default_rng(9).standard_normal((1, 16)).astype(np.float32)
    record = GenerationRecord(prompt="MONA LISA by leonardo")
    # check_embeddings has no prompt side; the image path does. Use the stored vectors through check():
    results = checker.check_embeddings(vec, records=[record])
    assert results[0].prompt is None
    section = checker.prompt_section(record, None, "sd1", Policy(), monitored=False)
    assert section.caption_matches["rows"] == 5 and section.caption_matches["near_duplicates"] == 4
    assert section.verdict == UNAVAILABLE and "not monitored" in section.reason


# bench/q2_memorization.py: its statistics, and a seconds-long run of each mode ------------------------------------

def _q2_bench():
    import importlib.util
    from pathlib import Path

    if "q2_memorization" not in sys.modules:  # dataclasses look their module up in sys.modules
        path = Path(__file__).resolve().parents[1] / "bench" / "q2_memorization.py"
        spec = importlib.util.spec_from_file_location("q2_memorization", path)
        sys.modules["q2_memorization"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["q2_memorization"]


def test_q2_statistics_auc_tpr_at_1pct_fpr_and_tiled_l2():
    q2 = _q2_bench()
    neg = np.arange(200, dtype=float)  # 200 negatives: k = 2 may lie above, so the threshold is the 3rd highest
    tpr, threshold = q2.tpr_at_fpr([197.5, 198.0, 199.5], neg)
    assert threshold == 197.0 and tpr == 1.0
    assert q2.tpr_at_fpr([197.0], neg)[0] == 0.0  # ties with the threshold are not flagged
    assert q2.auc([2.0, 3.0], [1.0, 2.0]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    ci = q2.bootstrap([5.0, 6.0, 7.0], neg / 100, resamples=50)
    assert ci["auc"] == (1.0, 1.0) and ci["tpr"] == (1.0, 1.0)
    a = np.zeros((16, 16, 3), np.float32)
    b = a.copy()
    b[:4, :4] = 0.3  # one tile off by 0.3: the tiled L2 is that tile's RMS, not the image's
    assert q2.tiled_l2(a, b) == pytest.approx(0.3) and q2.tiled_l2(a[None], b[None]).shape == (1,)
    assert q2.round_up(0.012341) == 0.01235 and q2.round_up(0.0123) == 0.01231


def _finite_table(text: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith(("step 1", "mean of steps"))]
    assert len(rows) == 3, text
    assert "nan" not in " ".join(rows) and "Wen et al." in text, text
    return rows


def test_q2_bench_smoke_on_the_toy(tmp_path, capsys):
    q2 = _q2_bench()
    assert q2.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    _finite_table(out)
    assert "not Stable Diffusion" in out
    saved = json.loads((tmp_path / "threshold-smoke.json").read_text())
    assert np.isfinite(saved["results"]["1"]["auc"])


def test_q2_bench_calibrates_a_saved_diffusers_pipeline(tmp_path, capsys):
    """--model loads a pipeline folder through from_pretrained, reads the signal with the integration's hook and
    prints the table with a threshold for the family table (the tiny random pipeline: numbers, not meaning)."""
    import tiny_pipeline

    q2 = _q2_bench()
    tiny_pipeline.pipeline(tmp_path / "pipe").save_pretrained(tmp_path / "pipe")
    sample_image("camera").convert("RGB").resize((64, 64)).save(tmp_path / "camera.png")
    (tmp_path / "memorized.txt").write_text("the starry night by vincent van gogh\nmona lisa\n"
                                            f"a photo of a camera\t{tmp_path / 'camera.png'}\n")
    (tmp_path / "controls.txt").write_text("a red bicycle\n# a comment\n\na quiet river at dawn\nan old map\n")
    assert q2.main(["--model", str(tmp_path / "pipe"), "--memorized", str(tmp_path / "memorized.txt"),
                    "--controls", str(tmp_path / "controls.txt"), "--steps", "2", "--device", "cpu",
                    "--resamples", "50", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    rows = _finite_table(out)
    assert rows[1].startswith("mean of steps 1-2 (of 3)")
    assert re.search(r"THRESHOLDS\['sd1'\] .*: \d", out), out
    saved = json.loads((tmp_path / "out" / "model-pipe.json").read_text())
    counts = saved["counts"]  # the line with an image is verified by generation (a random pipeline: not a copy)
    assert counts["memorized prompts listed"] == 3 and counts["controls"] == 3
    assert counts["listed with an image: reproduced"] + counts["listed with an image: not reproduced (left out)"] == 1
