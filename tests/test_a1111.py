"""A1111/Forge extension without a webui: stand-ins for modules.scripts, modules.shared, modules.paths,
modules.script_callbacks and gradio with the webui's signatures; the scripts/ file loaded the way the
webui loads it (importlib from its path); the processing loop driven as modules/processing.py does."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from provenance_guard.core.record import png_text_chunks, read_record
from provenance_guard.demo import sample_image

ROOT = Path(__file__).resolve().parents[1]


class Script:
    """modules.scripts.Script's surface used by extensions (A1111 1.10 / Forge)."""

    def elem_id(self, item_id):
        return f"script_provenance_guard_{item_id}"

    def postprocess_image(self, p, pp, *args):
        pass

    def postprocess_image_after_composite(self, p, pp, *args):
        pass


class PostprocessImageArgs:  # A1111 <= 1.9
    def __init__(self, image):
        self.image = image


class PostprocessImageArgsForge:  # Forge / A1111 1.10: the global index travels with the image
    def __init__(self, image, index):
        self.image = image
        self.index = index


class PostprocessBatchListArgs:
    def __init__(self, images):
        self.images = images


class OptionInfo:
    """modules.options.OptionInfo's constructor (A1111 1.10 / Forge)."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section, self.category_id = section, category_id


def options_section(section_identifier, options_dict):
    """modules.options.options_section, as in the webui."""
    for v in options_dict.values():
        if len(section_identifier) == 2:
            v.section = section_identifier
        elif len(section_identifier) == 3:
            v.section = section_identifier[0:2]
            v.category_id = section_identifier[2]
    return options_dict


def draw_setting(key, info):
    """What modules/ui_settings.py does with each option when it builds the settings page: a default that is
    not str, int or bool needs a component, else the webui refuses to start ("bad options item type")."""
    args = info.component_args() if callable(info.component_args) else info.component_args or {}
    if info.component is None:
        if type(info.default) not in (str, int, bool):
            raise Exception(f"bad options item type: {type(info.default)} for key {key}")
        return None
    if isinstance(info.section, tuple) and len(info.section) != 2:
        raise Exception(f"section {info.section} must be (id, label)")
    return info.component(label=info.label, value=info.default, elem_id=f"setting_{key}", **args)


class Options:
    def __init__(self):
        self.data_labels = {}
        self.save_images_before_highres_fix = False

    def add_option(self, key, info):
        self.data_labels[key] = info
        setattr(self, key, info.default)


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image, self.p, self.filename, self.pnginfo = image, p, filename, pnginfo


class FakeGradio(types.ModuleType):
    """Just enough of gradio for ui(): context managers and components that remember their kwargs."""

    def __init__(self):
        super().__init__("gradio")
        self.made = []

        class Block:
            def __init__(s, *a, **k):
                s.args, s.kwargs = a, k
                self.made.append(s)

            def __enter__(s):
                return s

            def __exit__(s, *a):
                return False

        for name in ("Accordion", "Row", "Checkbox", "Dropdown", "Textbox", "Slider", "Radio", "HTML", "Number"):
            setattr(self, name, type(name, (Block,), {}))


@pytest.fixture
def webui(tmp_path, monkeypatch, built_bundle):
    models = tmp_path / "models"
    (models / "provenance").mkdir(parents=True)
    shutil.copytree(built_bundle, models / "provenance" / "studio-refs")
    modules = types.ModuleType("modules")
    scripts_mod = types.ModuleType("modules.scripts")
    scripts_mod.Script = Script
    scripts_mod.AlwaysVisible = object()
    scripts_mod.PostprocessImageArgs = PostprocessImageArgs
    scripts_mod.PostprocessBatchListArgs = PostprocessBatchListArgs
    shared = types.ModuleType("modules.shared")
    shared.opts = Options()
    shared.OptionInfo = OptionInfo
    shared.options_section = options_section
    paths = types.ModuleType("modules.paths")
    paths.models_path = str(models)
    callbacks = types.ModuleType("modules.script_callbacks")
    registry = {"ui_settings": [], "before_image_saved": [], "image_saved": [], "app_started": [],
                "cfg_denoiser": [], "cfg_denoised": []}
    callbacks.on_ui_settings = registry["ui_settings"].append
    callbacks.on_before_image_saved = registry["before_image_saved"].append
    callbacks.on_image_saved = registry["image_saved"].append
    callbacks.on_app_started = registry["app_started"].append
    callbacks.on_cfg_denoiser = registry["cfg_denoiser"].append
    callbacks.on_cfg_denoised = registry["cfg_denoised"].append
    callbacks.ImageSaveParams = ImageSaveParams
    modules.scripts, modules.shared, modules.paths, modules.script_callbacks = scripts_mod, shared, paths, callbacks
    gradio = FakeGradio()
    for name, mod in {"modules": modules, "modules.scripts": scripts_mod, "modules.shared": shared,
                      "modules.paths": paths, "modules.script_callbacks": callbacks, "gradio": gradio}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    # As the webui: script_loading.load_module -> spec_from_file_location(basename, path).
    path = ROOT / "scripts" / "provenance_guard.py"
    spec = importlib.util.spec_from_file_location(path.name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = [v for v in module.__dict__.values() if isinstance(v, type) and issubclass(v, Script)]
    assert len(classes) == 1, classes  # the webui instantiates every Script subclass it finds
    for fn in registry["ui_settings"]:
        fn()
    yield types.SimpleNamespace(cls=classes[0], registry=registry, shared=shared, gradio=gradio, models=models)


class P:
    """A StableDiffusionProcessingTxt2Img as far as scripts see it."""

    def __init__(self, n, n_iter=1):
        self.batch_size, self.iteration, self.n_iter = n, 0, n_iter
        self.all_prompts = [f"prompt {i}" for i in range(n * n_iter)]
        self.all_seeds = [1000 + i for i in range(n * n_iter)]
        self.prompts, self.seeds = self.all_prompts[:n], self.all_seeds[:n]
        self.negative_prompts = ["lowres"] * n
        self.sampler_name, self.steps, self.cfg_scale, self.width, self.height = "Euler a", 20, 7.0, 96, 96
        self.extra_generation_params = {}
        self.comments = []
        self.enable_hr = False

    def comment(self, text):
        self.comments.append(text)


def create_infotext(p, index=0, use_main_prompt=False):
    """modules/processing.py create_infotext's handling of extra_generation_params: lists are indexed by the
    image's position, callables get the function's locals (p, index, use_main_prompt, ...)."""
    if use_main_prompt:
        index = 0
    generation_params = {"Steps": p.steps, **p.extra_generation_params}
    for key, value in generation_params.items():
        try:
            if isinstance(value, list):
                generation_params[key] = value[index]
            elif callable(value):
                generation_params[key] = value(**locals())
        except Exception:
            generation_params[key] = None
    return ", ".join(f"{k}: {v}" for k, v in generation_params.items() if v is not None)


class Processed:
    """modules.processing.Processed: keeps p's extra_generation_params dict itself; js() drops callables."""

    def __init__(self, p, images, infotexts):
        self.images, self.infotexts = images, infotexts
        self.extra_generation_params = p.extra_generation_params
        self.comments = "\n".join(p.comments)

    def js(self):
        return json.dumps({"extra_generation_params": self.extra_generation_params, "infotexts": self.infotexts},
                          default=lambda o: None)


def is_placeholder(image) -> bool:
    """Black with a light notice: most pixels are pure black."""
    return float((np.asarray(image.convert("RGB")) == 0).all(axis=2).mean()) > 0.5


def chw(name: str) -> torch.Tensor:
    arr = np.asarray(sample_image(name).convert("RGB").resize((96, 96))).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)



def generate(web, names, args, forge=False, n_iter=1, change=None):
    """modules/processing.py's loop: per batch the batch hooks, per image postprocess_image, the overlay,
    postprocess_image_after_composite, the save (with its infotext); then the grid, Processed, postprocess.
    ``change(i, image)`` stands for what happens between the batch check and the final image (face
    restoration, the inpaint overlay, another script)."""
    script = web.cls()
    p = P(len(names), n_iter)
    originals = [chw(n) for n in names] * n_iter
    script.process(p, *args)
    saved, infotexts, gallery = [], [], []
    for iteration in range(n_iter):
        p.iteration = iteration
        p.prompts = p.all_prompts[iteration * p.batch_size:(iteration + 1) * p.batch_size]
        p.seeds = p.all_seeds[iteration * p.batch_size:(iteration + 1) * p.batch_size]
        batch = PostprocessBatchListArgs([t.clone() for t in originals[:len(names)]])
        script.postprocess_batch_list(p, batch, *args, batch_number=iteration)
        for i, x in enumerate(batch.images):
            p.batch_index = i
            image = Image.fromarray((255.0 * x.permute(1, 2, 0).numpy()).astype(np.uint8))
            index = iteration * p.batch_size + i
            pp = PostprocessImageArgsForge(image, index) if forge else PostprocessImageArgs(image)
            script.postprocess_image(p, pp, *args)
            if change is not None:
                pp.image = change(index, pp.image)
            script.postprocess_image_after_composite(p, pp, *args)
            infotext = create_infotext(p, index=i)
            params = ImageSaveParams(pp.image, p, f"{index:05d}.png", {"parameters": infotext})
            for cb in web.registry["before_image_saved"]:
                cb(params)
            saved.append(params)
            infotexts.append(infotext)
            gallery.append(pp.image)
    grid_infotext = create_infotext(p, use_main_prompt=True)
    processed = Processed(p, gallery, infotexts)
    script.postprocess(p, processed, *args)
    processed.grid_infotext = grid_infotext
    return p, processed, saved, originals


def args(**kw):
    values = dict(enabled=True, bundle="studio-refs", bundle_path="", use_bundle_thresholds=True, warn=0.9,
                  block=0.95, action="warn", fail_mode="open", verify="confirm", fetch_references=False, bundle_url="",
                  views="whole")
    values.update(kw)
    from provenance_guard.a1111_extension.script import ARG_NAMES

    return [values[k] for k in ARG_NAMES]


def test_settings_section_and_ui(webui):
    opts = webui.shared.opts
    assert opts.provenance_guard_action == "warn" and opts.provenance_guard_fail_mode == "open"
    for key, info in opts.data_labels.items():
        draw_setting(key, info)  # the settings page can be built: the webui starts
        assert info.section == ("provenance_guard", "Provenance Guard") and info.category_id == "postprocessing"
    kinds = {k: getattr(v.component, "__name__", None) for k, v in opts.data_labels.items()}
    assert kinds["provenance_guard_warn"] == kinds["provenance_guard_block"] == "Slider"
    assert kinds["provenance_guard_action"] == kinds["provenance_guard_fail_mode"] == "Radio"
    assert opts.data_labels["provenance_guard_action"].component_args == {"choices": ["warn", "block"]}
    with pytest.raises(Exception, match="bad options item type"):  # the stand-in refuses what the webui refuses
        draw_setting("x", OptionInfo(0.9, "a float without a component"))
    script = webui.cls()
    assert script.title() == "Provenance Guard" and script.show(False) is sys.modules["modules.scripts"].AlwaysVisible
    webui.gradio.made.clear()
    components = script.ui(False)
    from provenance_guard.a1111_extension.script import ARG_NAMES

    assert len(components) == len(ARG_NAMES) == 12 and ARG_NAMES[-2:] == ["bundle_url", "views"]  # new ones go last
    assert opts.provenance_guard_views == "whole" and kinds["provenance_guard_views"] == "Radio"
    assert opts.data_labels["provenance_guard_views"].component_args == {"choices": ["whole", "multi"]}
    assert opts.provenance_guard_bundle_url == "" and "downloaded once" in opts.data_labels[
        "provenance_guard_bundle_url"].label
    assert "index server URL (http://host:port/NAME)" in opts.data_labels["provenance_guard_bundle_path"].label
    dropdown = [c for c in webui.gradio.made if type(c).__name__ == "Dropdown"][0]
    assert dropdown.args[0] == ["studio-refs"]
    # A studio's defaults come from the settings; a stored value that is no choice is not shown.
    opts.provenance_guard_action = "block"
    webui.gradio.made.clear()
    script.ui(True)
    radio = [c for c in webui.gradio.made if type(c).__name__ == "Radio"][0]
    assert radio.kwargs["value"] == "block"
    opts.provenance_guard_action = "blok"  # hand-edited config.json: shown as (and counted as) the safe value
    webui.gradio.made.clear()
    script.ui(True)
    assert [c for c in webui.gradio.made if type(c).__name__ == "Radio"][0].kwargs["value"] == "block"


class Gradio3Update:
    """gradio 3.41.2's fixed update() signatures (what A1111's settings page calls on every load)."""

    class Dropdown:
        def __init__(self, choices=None, value=None, label=None, allow_custom_value=False, elem_id=None):
            pass

        @staticmethod
        def update(value=None, choices=None, label=None, info=None, show_label=None, container=None, scale=None,
                   min_width=None, interactive=None, placeholder=None, visible=None):
            return {"value": value, "choices": choices}

    class Number:
        def __init__(self, value=None, label=None, precision=None, minimum=None, maximum=None, elem_id=None):
            pass

        @staticmethod
        def update(value=None, minimum=None, maximum=None, step=None, label=None, info=None, show_label=None,
                   container=None, scale=None, min_width=None, interactive=None, visible=None):
            return {"value": value}

    class Slider:
        def __init__(self, minimum=0, maximum=100, value=None, step=None, label=None, elem_id=None):
            pass

        @staticmethod
        def update(value=None, minimum=None, maximum=None, step=None, label=None, info=None, show_label=None,
                   container=None, scale=None, min_width=None, interactive=None, visible=None):
            return {"value": value}

    class Radio:
        def __init__(self, choices=None, value=None, label=None, elem_id=None):
            pass

        @staticmethod
        def update(value=None, choices=None, label=None, info=None, show_label=None, container=None, scale=None,
                   min_width=None, interactive=None, visible=None):
            return {"value": value}


@pytest.mark.parametrize("gradio", ["3.41", "4.x"])
def test_every_setting_survives_the_settings_page_refresh(webui, monkeypatch, gradio):
    """modules/ui_settings.py get_value_for_setting: gr.update(value=..., **component_args) on every page load;
    under gradio 3 one keyword the component's update() does not take is an HTTP 500 for the whole page."""
    from provenance_guard.a1111_extension import settings

    for name in ("Dropdown", "Number", "Slider", "Radio"):
        cls = getattr(Gradio3Update, name)
        if gradio == "4.x":  # gradio 4: no Component.update(); gr.update takes any keyword
            cls = type(name, (), {"__init__": cls.__init__})
        monkeypatch.setattr(webui.gradio, name, cls)
    webui.shared.opts.data_labels.clear()
    settings.on_ui_settings()
    for key, info in webui.shared.opts.data_labels.items():
        args = info.component_args() if callable(info.component_args) else info.component_args or {}
        args = {k: v for k, v in args.items() if k != "precision"}  # what A1111 1.10 itself drops
        if info.component is not None and hasattr(info.component, "update"):
            info.component.update(value=info.default, **args)  # raises TypeError on an unknown keyword
        if info.component is not None:
            info.component(label=info.label, value=info.default, elem_id=key, **args)
    bundle = webui.shared.opts.data_labels["provenance_guard_bundle"].component_args()
    assert bundle["choices"] == ["studio-refs"]
    assert ("allow_custom_value" in bundle) == (gradio == "4.x")  # gradio 4 refuses a typed value without it


def test_api_callers_get_the_settings_of_each_call_for_what_they_leave_out(webui):
    """modules/api/api.py fills the arguments a caller leaves out with the values of the components ui()
    returns inside init_default_script_args, cached at the first API call: those are "as in Settings"."""
    from provenance_guard.a1111_extension import script as glue

    script = webui.cls()

    def init_default_script_args():  # the webui's own function name, as the API calls ui()
        return [c.kwargs.get("value") if not hasattr(c, "value") else c.value for c in script.ui(False)]

    cached = init_default_script_args()
    assert cached == [glue.FROM_SETTINGS] * len(glue.ARG_NAMES)
    drawn = script.ui(False)  # the UI itself still shows the settings
    assert [c.kwargs.get("value") for c in drawn][6] == "warn"
    opts = webui.shared.opts
    opts.provenance_guard_enabled, opts.provenance_guard_bundle = True, "studio-refs"
    opts.provenance_guard_verify, opts.provenance_guard_fail_mode = "off", "closed"
    sent = [True, "studio-refs"]  # a caller sending two arguments: the API fills in the cached rest
    values = glue.parse_args(sent + cached[len(sent):])
    assert values["verify"] == "off" and values["fail_mode"] == "closed" and values["enabled"] is True
    opts.provenance_guard_verify = "escalate"  # posted later: the next call follows it
    assert glue.parse_args(cached)["verify"] == "escalate"
    explicit = glue.parse_args([True, "studio-refs", "", True, 0.9, 0.95, "warn", "open", "confirm", False])
    assert explicit["verify"] == "confirm" and explicit["fail_mode"] == "open"  # what a caller sends wins
    p, processed, saved, _ = generate(webui, ["camera"], cached)
    record = json.loads(saved[0].pnginfo["provenance"])
    assert record["verify"]["mode"] == "escalate" and record["fail_mode"] == "closed"


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_warn_saves_and_annotates_each_image_with_its_own_verdict(webui, forge):
    p, processed, saved, originals = generate(webui, ["astronaut", "camera"], args(), forge=forge)
    assert len(saved) == 2
    np.testing.assert_array_equal(np.asarray(saved[0].image),
                                  (255.0 * originals[0].permute(1, 2, 0).numpy()).astype(np.uint8))
    assert "Provenance: block" in processed.infotexts[0] and "Provenance similarity: 0.99" in processed.infotexts[0]
    assert "Provenance: pass" in processed.infotexts[1] and "Provenance bundle: test-refs@" in processed.infotexts[1]
    # The grid's infotext and the response info's top level are the batch's: the worst verdict with a count.
    assert "Provenance: block 1 of 2" in processed.grid_infotext
    info = json.loads(processed.js())
    assert info["extra_generation_params"]["Provenance"] == "block 1 of 2"
    assert info["infotexts"][1].count("Provenance: pass") == 1
    assert any("image 1: BLOCK" in c and "astronaut.png" in c for c in p.comments)
    record = json.loads(saved[0].pnginfo["provenance"])
    assert record["verdict"] == "block" and record["generation"]["seed"] == 1000
    assert record["generation"]["prompt"] == "prompt 0" and record["generation"]["source"] == "a1111"
    results = json.loads(info["extra_generation_params"]["Provenance results"])  # the API's info
    assert [r["verdict"] for r in results] == ["block", "pass"] and results[0]["top"]["url"] == "astronaut.png"
    assert results[0]["matches"][0]["url"] == "astronaut.png" and results[0]["matches"][0]["verdict"] == "block"


def test_every_batch_of_n_iter_gets_its_own_verdicts(webui):
    """The webui passes each image's position in its batch: the callable adds the batch's offset."""
    p, processed, saved, _ = generate(webui, ["camera", "astronaut"], args(), n_iter=2)
    verdicts = [t.split("Provenance: ")[1].split(",")[0] for t in processed.infotexts]
    assert verdicts == ["pass", "block", "pass", "block"]
    assert [json.loads(s.pnginfo["provenance"])["generation"]["seed"] for s in saved] == [1000, 1001, 1002, 1003]
    assert "Provenance: block 2 of 4" in processed.grid_infotext


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_block_never_lets_the_original_reach_a_save(webui, forge):
    p, processed, saved, originals = generate(webui, ["astronaut", "camera"], args(action="block"), forge=forge)
    original = (255.0 * originals[0].permute(1, 2, 0).numpy()).astype(np.uint8)
    blocked = np.asarray(saved[0].image)
    assert blocked.shape == original.shape and not np.array_equal(blocked, original)
    assert np.mean(blocked) < 20  # black, with the notice drawn in light text
    assert processed.images[0] is saved[0].image  # the gallery shows the placeholder too
    np.testing.assert_array_equal(np.asarray(saved[1].image),
                                  (255.0 * originals[1].permute(1, 2, 0).numpy()).astype(np.uint8))
    assert json.loads(saved[0].pnginfo["provenance"])["verdict"] == "block"
    assert "blocked 1 image(s)" in processed.comments


def test_the_final_pixels_are_checked_when_they_changed_after_the_batch(webui):
    """Face restoration, the inpaint overlay or another script changed an image after the batch check: the
    check sees the final pixels (postprocess_image_after_composite), whatever order hooks ran in."""
    astronaut = sample_image("astronaut").convert("RGB").resize((96, 96))
    p, processed, saved, _ = generate(webui, ["camera"], args(action="block"),
                                      change=lambda i, image: astronaut.copy())
    assert is_placeholder(saved[0].image)
    record = json.loads(saved[0].pnginfo["provenance"])
    assert record["verdict"] == "block" and any("final pixels" in w for w in record["warnings"])


def test_record_written_into_a_real_png(webui, tmp_path):
    _, _, saved, _ = generate(webui, ["coffee"], args())
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in saved[0].pnginfo.items():  # what images.save_image_with_geninfo does with params.pnginfo
        info.add_text(k, v)
    path = tmp_path / "00000.png"
    saved[0].image.save(path, pnginfo=info)
    chunks = png_text_chunks(path.read_bytes())
    assert "parameters" in chunks and read_record(path).matches[0].url == "coffee.png"


@pytest.mark.parametrize("action", ["warn", "block"])
@pytest.mark.parametrize("mode,verdict,saved_original", [("open", "unchecked", True), ("closed", "block", False)])
def test_fail_modes_whatever_the_action(webui, action, mode, verdict, saved_original):
    """One rule: under fail mode closed an image that could not be checked is withheld, whatever the action."""
    p, processed, saved, originals = generate(webui, ["camera"], args(bundle="gone", action=action, fail_mode=mode))
    original = (255.0 * originals[0].permute(1, 2, 0).numpy()).astype(np.uint8)
    assert np.array_equal(np.asarray(saved[0].image), original) == saved_original
    assert f"Provenance: {verdict}" in processed.infotexts[0]
    assert "not in" in json.loads(saved[0].pnginfo["provenance"])["error"]


def test_thresholds_the_run_cannot_use_fail_it_under_the_fail_mode(webui):
    p, processed, saved, _ = generate(webui, ["camera"], args(fail_mode="closed", use_bundle_thresholds=False,
                                                              warn=0.99, block=0.9))
    record = json.loads(saved[0].pnginfo["provenance"])
    assert record["verdict"] == "block" and "thresholds" in record["error"]
    assert "Settings > Provenance Guard" in record["error"] and is_placeholder(saved[0].image)


@pytest.mark.parametrize("key,bad,safe", [("fail_mode", "sometimes", "closed"), ("action", "blok", "block"),
                                          ("verify", "bogus", "confirm+escalate"), ("fail_mode", None, "closed"),
                                          ("views", "many", "multi"), ("views", ["multi"], "multi")])
def test_an_unusable_safety_setting_counts_as_its_safe_value(webui, caplog, key, bad, safe):
    """A hand-edited config.json: the value counts as the safe one, and the run says so (never fails open)."""
    from provenance_guard.a1111_extension import settings

    settings._said.clear()
    opts = webui.shared.opts
    # the bundle is missing too, so a fail mode that failed open would pass the image unchecked
    opts.provenance_guard_enabled = True
    opts.provenance_guard_bundle = "studio-refs" if key in ("verify", "action", "views") else "gone"
    name = "astronaut" if key == "action" else "camera"  # the astronaut is a reference: its verdict is block
    setattr(opts, f"provenance_guard_{key}", bad)
    with caplog.at_level("WARNING", logger="provenance_guard"):
        p, processed, saved, originals = generate(webui, [name], [None] * 10)  # all from the settings
        generate(webui, [name], [None] * 10)
    record = json.loads(saved[0].pnginfo["provenance"])
    if key in ("verify", "views"):
        assert not record.get("error"), record["error"]
    assert any(f"counts as {safe!r}" in w for w in record["warnings"]), record["warnings"]
    assert sum(f"counts as {safe!r}" in r.message for r in caplog.records) == 1  # said once
    if key == "fail_mode":
        assert record["verdict"] == "block" and is_placeholder(saved[0].image)  # not an unchecked pass
    if key == "verify":
        assert record["verify"]["mode"] == "confirm+escalate"
    if key == "action":
        assert record["verdict"] == "block" and is_placeholder(saved[0].image)


@pytest.fixture
def views_seen(monkeypatch):
    """The views of every check the script runs (the policy it hands core)."""
    from provenance_guard.core.check import Checker

    seen, real = [], Checker.check

    def spy(self, images, *a, policy=None, **k):
        seen.append(policy.views)
        return real(self, images, *a, policy=policy, **k)

    monkeypatch.setattr(Checker, "check", spy)
    return seen


def test_the_views_setting_and_argument_reach_the_check(webui, views_seen):
    """Views: "whole" by default; the setting decides for a caller that leaves the argument out (the older,
    shorter argument list included), the argument wins when sent; multi finds a reference inset into a
    larger image through the part that holds it and verifies it there."""
    from provenance_guard.a1111_extension import settings

    assert settings.DEFAULTS["views"] == "whole" and set(settings.VIEWS) == set(__import__(
        "provenance_guard.core.policy", fromlist=["VIEWS"]).VIEWS)
    generate(webui, ["camera"], args())
    generate(webui, ["camera"], args(views="multi"))
    webui.shared.opts.provenance_guard_views = "multi"
    generate(webui, ["camera"], args(views=None))  # null: as in Settings
    generate(webui, ["camera"], args()[:11])  # an API caller from before the argument existed
    generate(webui, ["camera"], args(views="whole"))
    assert views_seen == ["whole", "multi", "multi", "multi", "whole"]


def test_multi_views_find_and_verify_a_copy_inside_a_larger_image(webui, monkeypatch):
    """A reference pasted into a quarter of an unrelated generated image: the whole-image query does not
    reach the reference, the multi-view query finds it through that quarter and verifies it there."""
    def composite(name):  # 256 x 256: the reference in the top-left quarter, an unrelated photo around it
        def scaled(n, side):
            img = sample_image(n).convert("RGB").resize((side, side))
            return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0).permute(2, 0, 1)

        base = scaled("coins", 256)
        base[:, :128, :128] = scaled(name, 128)
        return base

    monkeypatch.setattr(sys.modules[__name__], "chw", composite)
    found = {}
    for views in ("whole", "multi"):
        p, processed, saved, _ = generate(webui, ["astronaut"], args(views=views, verify="confirm+escalate"))
        top = json.loads(saved[0].pnginfo["provenance"])["matches"][0]
        found[views] = (top.get("view"), top["url"], top["verification"]["status"], top["score"])
    assert found["multi"][:3] == ("top-left", "astronaut.png", "copy"), found
    assert found["whole"][0] is None and found["multi"][3] > found["whole"][3], found


def test_a_block_the_prompt_raised_says_so_and_a_missing_score_is_no_crash():
    from provenance_guard.core import report
    from provenance_guard.core.memorization import PromptCheck
    from provenance_guard.core.result import CheckResult

    raised = CheckResult(verdict="block", max_score=None, matches=[], model=None, thresholds=[], fail_mode="open",
                         image={}, generation=None, prompt=PromptCheck(memorization_score=0.9, verdict="flag"))
    message = report.block_message(raised)
    assert "prompt looks memorized" in message and "too close" not in message
    assert all("training image" not in n for n in report.short_notices(raised))
    plain = CheckResult(verdict="block", max_score=None, matches=[], model=None, thresholds=[], fail_mode="open",
                        image={}, generation=None)
    assert report.block_message(plain).startswith("Blocked: too close to a known training image")


def test_placeholder_says_the_real_reason_at_any_size():
    from provenance_guard.core import report
    from provenance_guard.core.policy import Policy
    from provenance_guard.core.check import failed_result

    failure = failed_result(Policy(fail_mode="closed"), "bundle 'gone' is not in /x; pick another or give its path")
    notices = report.short_notices(failure)
    assert all("training image" not in n for n in notices)
    for side in (64, 96, 128, 256):
        size, lines = report.fit_notice(side, side, report.block_message(failure), notices)
        text = " ".join(lines)
        assert lines and "training image" not in text and ("could not" in text or "Not checked" in text), (side, text)


def test_internal_error_under_closed_blocks(webui, monkeypatch):
    from provenance_guard.a1111_extension import script as glue

    monkeypatch.setattr(glue.ProvenanceGuardScript, "_check", lambda *a: 1 / 0)
    p, processed, saved, originals = generate(webui, ["camera"], args(action="block", fail_mode="closed"))
    assert is_placeholder(saved[0].image) and "Provenance: block" in processed.infotexts[0]
    assert "internal error" in json.loads(saved[0].pnginfo["provenance"])["error"]
    p, processed, saved, originals = generate(webui, ["camera"], args(action="block", fail_mode="open"))
    assert "Provenance: unchecked" in processed.infotexts[0] and not is_placeholder(saved[0].image)


def test_highres_copy_is_told_in_the_record_and_the_response(webui):
    webui.shared.opts.save_images_before_highres_fix = True
    script = webui.cls()
    p = P(1)
    p.enable_hr = True
    script.process(p, *args())
    assert p._provenance.warnings and "highres fix" in p.comments[0]
    batch = PostprocessBatchListArgs([chw("camera")])
    script.postprocess_batch_list(p, batch, batch_number=0)
    p.batch_index = 0
    pp = PostprocessImageArgs(Image.fromarray((255.0 * batch.images[0].permute(1, 2, 0).numpy()).astype(np.uint8)))
    script.postprocess_image_after_composite(p, pp)
    processed = Processed(p, [pp.image], [create_infotext(p, 0)])
    script.postprocess(p, processed)
    assert any("highres fix" in w for w in json.loads(pp.image.info["provenance"])["warnings"])
    results = json.loads(json.loads(processed.js())["extra_generation_params"]["Provenance results"])
    assert any("highres fix" in w for w in results[0]["warnings"])


def test_disabled_does_nothing(webui):
    p, processed, saved, _ = generate(webui, ["astronaut"], args(enabled=False))
    assert "Provenance" not in processed.infotexts[0] and "provenance" not in saved[0].pnginfo


def test_panel_data_is_per_generation_and_drawn_as_text(webui, tmp_path):
    """The panel is drawn from this generation's info (no shared state, no route); the script only ever
    inserts captions and urls as text and links http(s) alone."""
    from provenance_guard.core.bundle import Bundle, BundleWriter

    b = Bundle.open(webui.models / "provenance" / "studio-refs")
    with BundleWriter(tmp_path / "evil", model=b.model, dim=b.dim) as w:
        w.add(b.vector([0]), [{"url": "javascript:alert(1)", "caption": "<script>alert('x')</script><b>hi</b>"}])
        w.finish()
    _, processed, _, _ = generate(webui, ["astronaut"], args(bundle_path=str(tmp_path / "evil")))
    results = json.loads(json.loads(processed.js())["extra_generation_params"]["Provenance results"])
    assert results[0]["matches"][0]["caption"] == "<script>alert('x')</script><b>hi</b>"
    assert webui.registry["app_started"] == []  # no route: nothing to reach without the webui's auth
    js = (ROOT / "javascript" / "provenance_guard.js").read_text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "outerHTML" not in js
    assert "generation_info_" in js and 'protocol === "http:" || parsed.protocol === "https:"' in js


_REAL_FIND_SPEC = importlib.util.find_spec
_REAL_VERSION = importlib.metadata.version


def run_install(monkeypatch, versions: dict, missing: set, skip: bool = False):
    """Run install.py as the webui does, with the given installed versions and missing modules."""
    import importlib.metadata as md

    calls = []
    launch = types.ModuleType("launch")
    launch.args = types.SimpleNamespace(skip_install=skip)

    def run_pip(command, desc):
        path = command.split('-c "')[1].rstrip('"')
        calls.append((command, Path(path).read_text()))

    launch.run_pip = run_pip
    monkeypatch.setitem(sys.modules, "launch", launch)
    real_find, real_version = _REAL_FIND_SPEC, _REAL_VERSION
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find(name, *a))

    def version(dist):
        if dist in versions:
            if versions[dist] is None:
                raise md.PackageNotFoundError(dist)
            return versions[dist]
        return real_version(dist)

    monkeypatch.setattr(md, "version", version)
    spec = importlib.util.spec_from_file_location("install", ROOT / "install.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return calls


def test_install_py_pins_what_pip_sees_and_installs_only_what_is_missing(monkeypatch):
    calls = run_install(monkeypatch, {"torch": "2.14.1", "torchvision": "0.29.1", "numpy": "2.4.6"}, {"faiss"})
    assert len(calls) == 1 and '"faiss-cpu>=1.11"' in calls[0][0]
    # the version pip sees, never torch.__version__'s "+cu130" (pip could not resolve that)
    assert calls[0][1].splitlines() == ["torch==2.14.1", "torchvision==0.29.1", "numpy==2.4.6"]
    assert run_install(monkeypatch, {}, set()) == []  # everything there: nothing to do
    assert run_install(monkeypatch, {}, {"faiss"}, skip=True) == []


def test_install_py_upgrades_a_faiss_too_old_for_bundles(monkeypatch):
    """An importable faiss older than 1.11 lacks the memory-mapped views bundles open with: it is upgraded."""
    calls = run_install(monkeypatch, {"faiss-cpu": "1.8.0", "numpy": "1.26.2", "pyarrow": "25.0.1"}, set())
    assert [c[0].split('"')[1] for c in calls] == ["faiss-cpu>=1.11"] and "numpy==1.26.2" in calls[0][1]
    assert run_install(monkeypatch, {"faiss-cpu": "1.11.0", "numpy": "1.26.2", "pyarrow": "25.0.1"}, set()) == []


@pytest.mark.parametrize("pyarrow", [None, "26.0.1"])
def test_install_py_keeps_pyarrow_below_26_beside_numpy_1(monkeypatch, pyarrow):
    """pyarrow 26 needs numpy 2 but does not say so to pip: beside the webui's numpy 1.26 it is replaced."""
    calls = run_install(monkeypatch, {"numpy": "1.26.2", "pyarrow": pyarrow}, {"pyarrow"} if pyarrow is None else set())
    assert [c[0].split('"')[1] for c in calls] == ["pyarrow>=14,<26"] and "numpy==1.26.2" in calls[0][1]
    assert run_install(monkeypatch, {"numpy": "1.26.2", "pyarrow": "25.0.1"}, set()) == []


def test_install_py_installs_c2pa_when_missing_and_a_failure_never_stops_the_webui(monkeypatch, capsys):
    calls = run_install(monkeypatch, {}, {"c2pa"})
    assert [c[0].split('"')[1] for c in calls] == ["c2pa-python>=0.38,<0.39"]

    def failing(command, desc):
        raise RuntimeError("Couldn't install c2pa-python (no wheel for this platform)")

    launch = types.ModuleType("launch")
    launch.args = types.SimpleNamespace(skip_install=False)
    launch.run_pip = failing
    monkeypatch.setitem(sys.modules, "launch", launch)
    spec = importlib.util.spec_from_file_location("install", ROOT / "install.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # no exception: the webui goes on
    assert "Content Credentials are off" in capsys.readouterr().out


def test_install_py_imports_nothing_heavy():
    text = (ROOT / "install.py").read_text()
    assert "import torch" not in text and "import open_clip" not in text and "importlib.metadata" in text


def test_a_takedown_applies_to_the_next_generation_without_a_restart(webui):
    from provenance_guard.index_builder.maintain import remove_rows

    _, processed, _, _ = generate(webui, ["astronaut"], args())
    assert "Provenance: block" in processed.infotexts[0]
    remove_rows(webui.models / "provenance" / "studio-refs", urls=["astronaut.png"], reason="opt-out")
    _, processed, saved, _ = generate(webui, ["astronaut"], args())
    record = json.loads(saved[0].pnginfo["provenance"])
    assert "Provenance: block" not in processed.infotexts[0]
    assert "astronaut.png" not in [m["url"] for m in record["matches"]]


def test_the_placeholder_is_drawn_with_the_webuis_bitmap_font(webui, monkeypatch):
    """A1111 and Forge pin Pillow 9.5, whose default font is a latin-1 bitmap font: the notice (a dash, a
    caption in any script) must still be drawn, never raise."""
    from PIL import ImageFont

    from provenance_guard.core import report

    # Pillow >= 10.1 keeps the bitmap font as load_default_imagefont(); before, load_default() is it.
    bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)
    monkeypatch.setattr(report, "_font", lambda size: bitmap())
    img = report.placeholder_image(256, 256, "Blocked — too close to «日本の写真» … a known training image")
    assert is_placeholder(img) and np.asarray(img).max() > 200  # black, with light text on it
    p, processed, saved, originals = generate(webui, ["astronaut"], args(action="block"))
    assert is_placeholder(saved[0].image) and np.asarray(saved[0].image).max() > 200
    assert json.loads(saved[0].pnginfo["provenance"])["verdict"] == "block"


def test_a_failing_final_hook_still_withholds_under_the_fail_mode(webui, monkeypatch):
    from provenance_guard.a1111_extension import script as glue

    def boom(*a, **k):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(glue, "placeholder_image", boom)
    p, processed, saved, originals = generate(webui, ["astronaut"], args(action="block", fail_mode="closed"))
    assert is_placeholder(saved[0].image)
    record = json.loads(saved[0].pnginfo["provenance"])
    assert record["verdict"] == "block" and "drawing failed" in record["error"]


def test_matches_are_verified_and_the_panel_gets_the_evidence(webui):
    p, processed, saved, _ = generate(webui, ["astronaut", "camera"], args(verify="confirm+escalate"))
    results = json.loads(json.loads(processed.js())["extra_generation_params"]["Provenance results"])
    top = results[0]["matches"][0]
    assert top["verification"]["status"] == "copy" and top["evidence"].startswith("data:image/jpeg;base64,")
    assert results[1]["matches"][0]["verification"]["status"] == "different"
    record = json.loads(saved[0].pnginfo["provenance"])
    assert record["matches"][0]["verification"]["status"] == "copy" and "evidence" not in saved[0].pnginfo["provenance"]
    js = (ROOT / "javascript" / "provenance_guard.js").read_text()
    assert 'startsWith("data:image/jpeg;base64,")' in js


@pytest.mark.parametrize("bad", [dict(bundle=5), dict(bundle=["studio-refs"]), dict(bundle_path={"a": 1}),
                                 dict(use_bundle_thresholds="no"), dict(bundle_url=["http://x/"])])
def test_arguments_of_any_type_never_let_an_image_through_unchecked(webui, bad):
    """An API caller's arguments are hostile: a bundle that is a number, a list or a dict, a switch that is
    a string. The run fails under its fail mode (closed here): never a hook that dies and saves the image."""
    p, processed, saved, originals = generate(webui, ["astronaut"], args(fail_mode="closed", action="warn", **bad))
    record = json.loads(saved[0].pnginfo["provenance"])
    assert record["verdict"] == "block" and record["error"] and is_placeholder(saved[0].image)


def test_a_broken_settings_value_of_another_type_fails_closed(webui, monkeypatch):
    opts = webui.shared.opts
    opts.provenance_guard_references = 7  # config.json edited by hand
    opts.provenance_guard_memorization_steps = "five"
    p, processed, saved, _ = generate(webui, ["astronaut"], args(fail_mode="closed"))
    record = json.loads(saved[0].pnginfo["provenance"])
    assert record["verdict"] == "block" and "not a folder path" in record["error"]
    # and an error nobody foresaw inside process(): the failing state stays, the image is withheld
    from provenance_guard.a1111_extension import script as glue

    monkeypatch.setattr(glue, "run_state", lambda values: 1 / 0)
    p, processed, saved, _ = generate(webui, ["camera"], args(fail_mode="open"))
    record = json.loads(saved[0].pnginfo["provenance"])
    assert record["verdict"] == "block" and "ZeroDivisionError" in record["error"] and is_placeholder(saved[0].image)


def test_a_bundle_url_is_pulled_once_into_models_provenance_and_reused(webui, built_bundle, tmp_path):
    """The bundle URL field: the first generation starts the download in the background and is withheld
    under fail mode closed with a message saying so (never a silent pass, never a frozen UI); once the bundle
    is there the check runs on it (no bundle is picked in the list: the pulled one is what is checked), and later generations, and a restart, reuse it without the network."""
    import threading

    from provenance_guard.a1111_extension import settings
    from provenance_guard.core import pull as pull_mod
    from test_pull import BundleServer, published_copy

    published_copy(built_bundle, tmp_path / "pub", "pulled")
    server = BundleServer(tmp_path / "pub" / "site")
    server.gate = threading.Event()  # the server holds every answer: the download is in progress
    url = f"{server.url}/bundles/pulled/"
    try:
        p, processed, saved, _ = generate(webui, ["astronaut"], args(bundle="", bundle_url=url, fail_mode="closed"))
        record = json.loads(saved[0].pnginfo["provenance"])
        assert record["verdict"] == "block" and is_placeholder(saved[0].image)
        assert "bundle downloading from" in record["error"] and "the check runs when it finishes" in record["error"]
        _, processed, saved, _ = generate(webui, ["astronaut"], args(bundle="", bundle_url=url, fail_mode="open"))
        assert json.loads(saved[0].pnginfo["provenance"])["verdict"] == "unchecked"
        server.gate.set()
        assert pull_mod.join_pulls(60)
        assert settings.bundle_choices() == ["pulled", "studio-refs"]
        hits = len(server.log)
        _, processed, saved, _ = generate(webui, ["astronaut"], args(bundle="", bundle_url=url, fail_mode="closed"))
        record = json.loads(saved[0].pnginfo["provenance"])
        assert record["verdict"] == "block" and record["error"] is None
        assert record["matches"][0]["url"] == "astronaut.png"
        pull_mod._JOBS.clear()  # a restart: the record beside the bundle finds it, no network
        _, processed, saved, _ = generate(webui, ["camera"], args(bundle="", bundle_url=url, fail_mode="closed"))
        assert json.loads(saved[0].pnginfo["provenance"])["verdict"] == "pass"
        assert len(server.log) == hits
        # the setting is the default for what a caller leaves out; a path and a URL at once is refused
        webui.shared.opts.provenance_guard_bundle_url = url
        _, processed, saved, _ = generate(webui, ["camera"], args(bundle="", fail_mode="closed")[:10])
        assert json.loads(saved[0].pnginfo["provenance"])["verdict"] == "pass"
        _, processed, saved, _ = generate(webui, ["camera"], args(bundle="", bundle_url=url, bundle_path=str(built_bundle),
                                                                  fail_mode="closed"))
        record = json.loads(saved[0].pnginfo["provenance"])
        assert record["verdict"] == "block" and "clear one of them" in record["error"]
    finally:
        server.close()


# Content Credentials -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    from provenance_guard.core.credentials import init_credentials

    folder = tmp_path_factory.mktemp("keys")
    init_credentials(folder, organization="Webui Studio")
    return folder


def signing_on(webui, keys, mode="on", prompts=True):
    from provenance_guard.a1111_extension import settings

    settings._said.clear()
    opts = webui.shared.opts
    opts.provenance_guard_credentials, opts.provenance_guard_credentials_folder = mode, str(keys)
    opts.provenance_guard_credentials_prompts = prompts


def save_like_webui(web, params, path: Path, stealth: bool = False) -> Path:
    """modules/images.save_image after the before-save callbacks: Forge's stealth infotext (the alpha channel,
    so RGBA), the file with params.pnginfo as PNG text chunks (infotext under "parameters", our record), written
    to a .tmp and renamed, then the on_image_saved callbacks."""
    from PIL import PngImagePlugin

    image = params.image
    if stealth:
        image = image.convert("RGBA")
        image.putalpha(254)
    info = PngImagePlugin.PngInfo()
    for k, v in params.pnginfo.items():
        info.add_text(k, str(v))
    params.filename = str(path)
    image.save(str(path) + ".tmp", format="PNG", pnginfo=info)
    Path(str(path) + ".tmp").replace(path)
    for cb in web.registry["image_saved"]:
        cb(params)
    return path


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge-stealth-rgba"])
def test_credentials_sign_each_saved_file_after_its_infotext_with_its_own_verdict(webui, keys, tmp_path, forge):
    """The signature is the file's last write: the infotext and the record chunk are there and the manifest
    is valid; each file carries its own image's check (the astronaut, a training image kept under warn, says
    block: never pass) and the prompts, unless the privacy setting leaves them out."""
    cr = pytest.importorskip("provenance_guard.core.credentials")
    pytest.importorskip("c2pa")
    signing_on(webui, keys)
    p, processed, saved, _ = generate(webui, ["astronaut", "camera"], args(), forge=forge)
    root = (keys / "root.pem").read_bytes()
    for i, params in enumerate(saved):
        path = save_like_webui(webui, params, tmp_path / f"{i:05d}.png", stealth=forge)
        chunks = png_text_chunks(path)
        assert chunks["parameters"] == processed.infotexts[i] and "provenance" in chunks
        status = cr.verify_file(path, root)
        assert status.state == "trusted", status.problems
        record = json.loads(chunks["provenance"])
        assert status.check["verdict"] == record["verdict"] == ["block", "pass"][i]
        assert status.generation["prompt"] == f"prompt {i}" and status.generation["seed"] == 1000 + i
        assert status.source_type == cr.SOURCE_TYPE
        with Image.open(path) as im:
            assert im.mode == ("RGBA" if forge else "RGB")
        assert read_record(path).verdict == record["verdict"]
    signing_on(webui, keys, prompts=False)
    _, _, saved, _ = generate(webui, ["camera"], args())
    status = cr.verify_file(save_like_webui(webui, saved[0], tmp_path / "private.png"))
    assert status.state == "valid" and "prompt" not in status.generation and status.generation["seed"] == 1000


def test_a_blocked_placeholder_says_block_and_a_record_the_run_did_not_make_is_never_signed(webui, keys, tmp_path):
    cr = pytest.importorskip("provenance_guard.core.credentials")
    pytest.importorskip("c2pa")
    signing_on(webui, keys)
    _, _, saved, _ = generate(webui, ["astronaut"], args(action="block"))
    path = save_like_webui(webui, saved[0], tmp_path / "blocked.png")
    assert is_placeholder(Image.open(path)) and cr.verify_file(path).check["verdict"] == "block"
    # a grid, an extras-tab save or an upload carrying someone's "pass" record: not this run's image
    p, _, saved, _ = generate(webui, ["camera"], args())
    forged = json.loads(saved[0].pnginfo["provenance"])
    forged["checked_at"] = "2020-01-01T00:00:00Z"
    other = ImageSaveParams(saved[0].image.copy(), p, "", {"parameters": "x", "provenance": json.dumps(forged)})
    assert cr.verify_file(save_like_webui(webui, other, tmp_path / "grid.png")).state == "absent"
    # the extension off for a run: nothing of it is signed
    _, _, saved, _ = generate(webui, ["camera"], args(enabled=False))
    assert cr.verify_file(save_like_webui(webui, saved[0], tmp_path / "off.png")).state == "absent"


@pytest.mark.parametrize("value", ["required", "yes"])  # an unusable value counts as required (the safe value)
def test_required_without_a_usable_key_blocks_every_image(webui, tmp_path, value):
    pytest.importorskip("c2pa")
    signing_on(webui, tmp_path / "no-keys", mode=value)
    p, processed, saved, _ = generate(webui, ["camera"], args(fail_mode="open"))
    record = json.loads(saved[0].pnginfo["provenance"])
    assert record["verdict"] == "block" and is_placeholder(saved[0].image)
    assert "Content Credentials are required" in record["error"] and "credentials init" in record["error"]
    assert 'Settings > Provenance Guard > "Content Credentials (C2PA)"' in record["error"]
    path = save_like_webui(webui, saved[0], tmp_path / "blocked.png")  # the placeholder, unsigned: nothing real
    assert is_placeholder(Image.open(path))
    if value == "yes":
        assert any("counts as 'required'" in w for w in record["warnings"])


def test_under_required_a_grid_or_an_early_copy_of_the_run_is_saved_as_a_placeholder(webui, keys, tmp_path):
    """Required: nothing real is left unsigned. The run's own images are signed; a grid (or a "save a copy
    before face restoration" file) carries no check of its own and becomes a placeholder saying why; under
    "on" it stays as the webui wrote it, unsigned."""
    cr = pytest.importorskip("provenance_guard.core.credentials")
    pytest.importorskip("c2pa")
    signing_on(webui, keys, mode="required")
    p, _, saved, _ = generate(webui, ["camera", "coffee"], args())
    for i, params in enumerate(saved):
        assert cr.verify_file(save_like_webui(webui, params, tmp_path / f"{i}.png")).state == "valid"
    grid = ImageSaveParams(Image.new("RGB", (192, 96), "gray"), p, "", {"parameters": "grid of the batch"})
    path = save_like_webui(webui, grid, tmp_path / "grid.png")
    assert is_placeholder(Image.open(path)) and cr.verify_file(path).state == "absent"
    # the webui's downscaled JPEG copy of a large image, written in the same save: signed as the image is
    p, _, saved, _ = generate(webui, ["coffee"], args())
    for cb in webui.registry.get("before_image_saved", []):
        cb(saved[0])
    saved[0].image.convert("RGB").save(tmp_path / "large.jpg", "JPEG")
    save_like_webui(webui, saved[0], tmp_path / "large.png")
    assert cr.verify_file(tmp_path / "large.jpg").state == "valid"
    assert cr.verify_file(tmp_path / "large.jpg").check["verdict"] == cr.verify_file(tmp_path / "large.png").check[
        "verdict"]
    signing_on(webui, keys, mode="on")
    p, _, saved, _ = generate(webui, ["camera"], args())
    grid = ImageSaveParams(Image.new("RGB", (192, 96), "gray"), p, "", {"parameters": "grid of the batch"})
    path = save_like_webui(webui, grid, tmp_path / "grid-on.png")
    assert not is_placeholder(Image.open(path)) and cr.verify_file(path).state == "absent"


def test_a_signature_that_fails_under_required_leaves_a_placeholder_and_under_on_the_file(webui, keys, tmp_path,
                                                                                          monkeypatch, caplog):
    cr = pytest.importorskip("provenance_guard.core.credentials")
    pytest.importorskip("c2pa")

    def broken(*a, **k):
        raise cr.CredentialsError("simulated signing failure; the file is unchanged")

    monkeypatch.setattr(cr, "sign_file", broken)
    signing_on(webui, keys, mode="required")
    p, _, saved, _ = generate(webui, ["camera"], args())
    out = tmp_path / "out"
    out.mkdir()
    path = save_like_webui(webui, saved[0], out / "req.png")
    assert is_placeholder(Image.open(path)) and "parameters" not in png_text_chunks(path)
    assert any("replaced by a placeholder" in c for c in p.comments)
    assert [f.name for f in out.iterdir()] == ["req.png"]  # no temporary file left
    signing_on(webui, keys, mode="on")
    with caplog.at_level("WARNING", logger="provenance_guard"):
        for n in range(2):
            _, _, saved, _ = generate(webui, ["camera"], args())
            path = save_like_webui(webui, saved[0], tmp_path / f"on{n}.png")
            assert not is_placeholder(Image.open(path)) and "parameters" in png_text_chunks(path)
    assert sum("saved without Content Credentials" in r.message for r in caplog.records) == 1


def test_without_c2pa_credentials_are_said_off_once_and_required_blocks(webui, keys, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "c2pa", None)
    signing_on(webui, keys)
    with caplog.at_level("WARNING", logger="provenance_guard"):
        p, _, saved, _ = generate(webui, ["camera"], args())
        p2, _, _, _ = generate(webui, ["camera"], args())
    said = [r.message for r in caplog.records if "Content Credentials are off" in r.message]
    assert len(said) == 1 and "c2pa-python is not installed" in said[0]
    assert any("Content Credentials are off" in c for c in p.comments) and not p2.comments
    assert json.loads(saved[0].pnginfo["provenance"])["verdict"] == "pass"  # "on": saved, unsigned
    signing_on(webui, keys, mode="required")
    _, _, saved, _ = generate(webui, ["camera"], args())
    record = json.loads(saved[0].pnginfo["provenance"])
    assert record["verdict"] == "block" and "c2pa-python is not installed" in record["error"]


def test_img2img_signs_the_input_image_as_the_parent_ingredient(webui, keys, tmp_path):
    c2pa = pytest.importorskip("c2pa")
    cr = pytest.importorskip("provenance_guard.core.credentials")
    signing_on(webui, keys)
    p, _, saved, _ = generate(webui, ["camera"], args())
    p.init_images = [sample_image("coffee").convert("RGB").resize((96, 96))]  # StableDiffusionProcessingImg2Img
    path = save_like_webui(webui, saved[0], tmp_path / "i2i.png")
    assert cr.verify_file(path).state == "valid"
    with open(path, "rb") as f, c2pa.Reader("image/png", f) as reader:
        manifest = reader.get_active_manifest()
    (ingredient,) = manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf"
    actions = next(a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"]
    assert any(a["action"] == "c2pa.edited" for a in actions)
