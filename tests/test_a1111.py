"""A1111/Forge extension without a webui: stand-ins for modules.scripts, modules.shared, modules.paths,
modules.script_callbacks and gradio with the webui's signatures; the scripts/ file loaded the way the
webui loads it (importlib from its path); the processing loop driven as modules/processing.py does."""
from __future__ import annotations

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
    """modules.scripts.Script's surface used by extensions."""

    def elem_id(self, item_id):
        return f"script_provenance_guard_{item_id}"


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
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None):
        self.default, self.label, self.section = default, label, section


class Options:
    def __init__(self):
        self.data_labels = {}

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

        for name in ("Accordion", "Row", "Checkbox", "Dropdown", "Textbox", "Slider", "Radio", "HTML"):
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
    paths = types.ModuleType("modules.paths")
    paths.models_path = str(models)
    callbacks = types.ModuleType("modules.script_callbacks")
    registry = {"ui_settings": [], "before_image_saved": [], "app_started": []}
    callbacks.on_ui_settings = registry["ui_settings"].append
    callbacks.on_before_image_saved = registry["before_image_saved"].append
    callbacks.on_app_started = registry["app_started"].append
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
    from provenance_guard.a1111_extension import script as glue

    glue.LAST_HTML.clear()


class P:
    """A StableDiffusionProcessingTxt2Img as far as scripts see it."""

    def __init__(self, n):
        self.batch_size, self.iteration, self.n_iter = n, 0, 1
        self.prompts = [f"prompt {i}" for i in range(n)]
        self.negative_prompts = ["lowres"] * n
        self.seeds = [1000 + i for i in range(n)]
        self.sampler_name, self.steps, self.cfg_scale, self.width, self.height = "Euler a", 20, 7.0, 96, 96
        self.extra_generation_params = {}
        self.comments = []
        self.enable_hr = False

    def comment(self, text):
        self.comments.append(text)


class Processed:
    def __init__(self, p, images, infotexts):
        self.images, self.infotexts = images, infotexts
        self.extra_generation_params = dict(p.extra_generation_params)
        self.comments = "\n".join(p.comments)


def chw(name: str) -> torch.Tensor:
    arr = np.asarray(sample_image(name).convert("RGB").resize((96, 96))).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def generate(web, names, args, forge=False):
    """modules/processing.py's loop for one batch: batch hook, per-image hook, infotext, save."""
    script = web.cls()
    p = P(len(names))
    originals = [chw(n) for n in names]
    script.process(p, *args)
    batch = PostprocessBatchListArgs([t.clone() for t in originals])
    script.postprocess_batch_list(p, batch, *args, batch_number=0)
    saved, infotexts, gallery = [], [], []
    for i, x in enumerate(batch.images):
        p.batch_index = i
        image = Image.fromarray((255.0 * x.permute(1, 2, 0).numpy()).astype(np.uint8))
        pp = PostprocessImageArgsForge(image, i) if forge else PostprocessImageArgs(image)
        script.postprocess_image(p, pp, *args)
        if forge:
            script.postprocess_image_after_composite(p, pp, *args)
        infotext = ", ".join(f"{k}: {v}" for k, v in p.extra_generation_params.items() if v is not None)
        params = ImageSaveParams(pp.image, p, f"{i:05d}.png", {"parameters": infotext})
        for cb in web.registry["before_image_saved"]:
            cb(params)
        saved.append(params)
        infotexts.append(infotext)
        gallery.append(pp.image)
    processed = Processed(p, gallery, infotexts)
    script.postprocess(p, processed, *args)
    return p, processed, saved, originals


def args(**kw):
    values = dict(enabled=True, bundle="studio-refs", bundle_path="", use_bundle_thresholds=True, warn=0.9,
                  block=0.95, action="warn", fail_mode="open")
    values.update(kw)
    from provenance_guard.a1111_extension.script import ARG_NAMES

    return [values[k] for k in ARG_NAMES]


def test_settings_section_and_ui(webui):
    opts = webui.shared.opts
    assert opts.provenance_guard_action == "warn" and opts.provenance_guard_fail_mode == "open"
    assert opts.data_labels["provenance_guard_block"].section == ("provenance_guard", "Provenance")
    script = webui.cls()
    assert script.title() == "Provenance Guard" and script.show(False) is sys.modules["modules.scripts"].AlwaysVisible
    components = script.ui(False)
    from provenance_guard.a1111_extension.script import ARG_NAMES

    assert len(components) == len(ARG_NAMES) == 8
    dropdown = [c for c in webui.gradio.made if type(c).__name__ == "Dropdown"][0]
    assert dropdown.args[0] == ["studio-refs"]
    # A studio's defaults come from the settings.
    opts.provenance_guard_action = "block"
    webui.gradio.made.clear()
    script.ui(True)
    radio = [c for c in webui.gradio.made if type(c).__name__ == "Radio"][0]
    assert radio.kwargs["value"] == "block"


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_warn_saves_and_annotates(webui, forge):
    p, processed, saved, originals = generate(webui, ["astronaut", "camera"], args(), forge=forge)
    assert len(saved) == 2
    np.testing.assert_array_equal(np.asarray(saved[0].image),
                                  (255.0 * originals[0].permute(1, 2, 0).numpy()).astype(np.uint8))
    assert "Provenance: block" in processed.infotexts[0] and "Provenance similarity: 0.99" in processed.infotexts[0]
    assert "Provenance: pass" in processed.infotexts[1] and "Provenance bundle: test-refs@" in processed.infotexts[1]
    assert any("image 1: BLOCK" in c and "astronaut.png" in c for c in p.comments)
    record = json.loads(saved[0].pnginfo["provenance"])
    assert record["verdict"] == "block" and record["generation"]["seed"] == 1000
    assert record["generation"]["prompt"] == "prompt 0" and record["generation"]["source"] == "a1111"
    results = json.loads(processed.extra_generation_params["Provenance results"])  # the API's info
    assert [r["verdict"] for r in results] == ["block", "pass"] and results[0]["top"]["url"] == "astronaut.png"


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


@pytest.mark.parametrize("mode,verdict,saved_original", [("open", "unchecked", True), ("closed", "block", False)])
def test_fail_modes(webui, mode, verdict, saved_original):
    p, processed, saved, originals = generate(webui, ["camera"], args(bundle="gone", action="block", fail_mode=mode))
    original = (255.0 * originals[0].permute(1, 2, 0).numpy()).astype(np.uint8)
    assert np.array_equal(np.asarray(saved[0].image), original) == saved_original
    assert f"Provenance: {verdict}" in processed.infotexts[0]
    assert "not in" in json.loads(saved[0].pnginfo["provenance"])["error"]


def test_internal_error_under_closed_blocks(webui, monkeypatch):
    from provenance_guard.a1111_extension import script as glue

    monkeypatch.setattr(glue.ProvenanceGuardScript, "_check", lambda *a: 1 / 0)
    p, processed, saved, originals = generate(webui, ["camera"], args(action="block", fail_mode="closed"))
    assert np.mean(np.asarray(saved[0].image)) < 20 and "Provenance: block" in processed.infotexts[0]
    assert "internal error" in json.loads(saved[0].pnginfo["provenance"])["error"]
    p, processed, saved, originals = generate(webui, ["camera"], args(action="block", fail_mode="open"))
    assert "Provenance: unchecked" in processed.infotexts[0] and np.mean(np.asarray(saved[0].image)) > 20


def test_disabled_does_nothing(webui):
    p, processed, saved, _ = generate(webui, ["astronaut"], args(enabled=False))
    assert "Provenance" not in processed.infotexts[0] and "provenance" not in saved[0].pnginfo


def test_panel_escapes_captions(webui, tmp_path):
    from provenance_guard.a1111_extension import script as glue

    from provenance_guard.core.bundle import Bundle, BundleWriter

    bundle = webui.models / "provenance" / "studio-refs"
    # A caption with markup, as LAION captions have, in a one-row bundle.

    b = Bundle.open(bundle)
    with BundleWriter(tmp_path / "evil", model=b.model, dim=b.dim) as w:
        w.add(b.vector([0]), [{"url": "javascript:alert(1)", "caption": "<script>alert('x')</script><b>hi</b>"}])
        w.finish()
    generate(webui, ["astronaut"], args(bundle_path=str(tmp_path / "evil")))
    html = glue.LAST_HTML["txt2img"]
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;hi&lt;/b&gt;" in html
    assert "href=\"javascript" not in html
    app = types.SimpleNamespace(routes={})
    app.add_api_route = lambda path, fn, methods: app.routes.__setitem__(path, fn)
    for cb in webui.registry["app_started"]:
        cb(None, app)
    assert app.routes["/provenance-guard/panel"]("txt2img")["html"] == html


def test_install_py_pins_torch_and_honours_skip_install(monkeypatch, tmp_path):
    calls = []
    launch = types.ModuleType("launch")
    launch.args = types.SimpleNamespace(skip_install=False)
    launch.run_pip = lambda command, desc: calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else real_find(name, *a))
    constraints = {}

    def capture(command, desc):
        calls.append(command)
        path = command.split('-c "')[1].rstrip('"')
        constraints["text"] = Path(path).read_text()

    launch.run_pip = capture
    spec = importlib.util.spec_from_file_location("install", ROOT / "install.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert len(calls) == 1 and "faiss-cpu" in calls[0]
    assert f"torch=={torch.__version__}" in constraints["text"]
    calls.clear()
    launch.args.skip_install = True
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert calls == []


def test_a_takedown_applies_to_the_next_generation_without_a_restart(webui):
    from provenance_guard.index_builder.maintain import remove_rows

    _, processed, _, _ = generate(webui, ["astronaut"], args())
    assert "Provenance: block" in processed.infotexts[0]
    remove_rows(webui.models / "provenance" / "studio-refs", urls=["astronaut.png"], reason="opt-out")
    _, processed, saved, _ = generate(webui, ["astronaut"], args())
    record = json.loads(saved[0].pnginfo["provenance"])
    assert "Provenance: block" not in processed.infotexts[0]
    assert "astronaut.png" not in [m["url"] for m in record["matches"]]
