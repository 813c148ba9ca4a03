"""ComfyUI node pack without ComfyUI: the root loaded as ComfyUI loads a cloned custom node (importlib spec
of the root __init__.py under a hyphenated module name), minimal stand-ins for folder_paths,
comfy_execution, comfy.utils, comfy.model_management and server, and float32 [B,H,W,C] tensors."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from provenance_guard.core.record import BATCH_SCHEMA
from provenance_guard.demo import sample_image

ROOT = Path(__file__).resolve().parents[1]


class ExecutionBlocker:
    def __init__(self, message):
        self.message = message


class PromptServer:
    instance = None

    def __init__(self):
        self.on_prompt_handlers = []

    def add_on_prompt_handler(self, handler):
        self.on_prompt_handlers.append(handler)


class ProgressBar:
    updates: list = []

    def __init__(self, total, node_id=None):
        self.total, self.node_id = total, node_id

    def update(self, value):
        ProgressBar.updates.append((self.node_id, value, self.total))


@pytest.fixture
def comfy(tmp_path, monkeypatch, built_bundle):
    """Stand-in ComfyUI modules and a models/provenance folder holding the test bundle."""
    models = tmp_path / "models"
    (models / "provenance").mkdir(parents=True)
    shutil.copytree(built_bundle, models / "provenance" / "studio-refs")
    paths: dict = {}
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models)
    fp.folder_names_and_paths = paths

    def add_model_folder_path(name, path, is_default=False):
        paths.setdefault(name, ([], set()))[0].append(path)

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = lambda name: list(paths[name][0])
    fp.get_user_directory = lambda: str(tmp_path / "user")
    graph_utils = types.ModuleType("comfy_execution.graph_utils")
    graph_utils.ExecutionBlocker = ExecutionBlocker
    comfy_execution = types.ModuleType("comfy_execution")
    comfy_execution.graph_utils = graph_utils
    server = types.ModuleType("server")
    PromptServer.instance = PromptServer()
    server.PromptServer = PromptServer
    comfy_pkg = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    ProgressBar.updates = []
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.throw_exception_if_processing_interrupted = lambda: None
    comfy_pkg.utils, comfy_pkg.model_management = utils, mm
    for name, mod in {"folder_paths": fp, "comfy_execution": comfy_execution,
                      "comfy_execution.graph_utils": graph_utils, "server": server, "comfy": comfy_pkg,
                      "comfy.utils": utils, "comfy.model_management": mm}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return types.SimpleNamespace(models=models, paths=paths, tmp=tmp_path)


def load_pack(module_name: str = "custom_nodes/provenance-guard"):
    """As ComfyUI's nodes.load_custom_node: spec from the folder's __init__.py, registered in sys.modules."""
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pack(comfy, monkeypatch):
    name = f"{comfy.tmp}/custom_nodes/provenance-guard".replace(".", "_x_")
    module = load_pack(name)
    yield module
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def tensor(*names: str, size: int = 96) -> torch.Tensor:
    arrays = [np.asarray(sample_image(n).convert("RGB").resize((size, size))) for n in names]
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)


def run(pack, images, **kw):
    node = pack.NODE_CLASS_MAPPINGS["ProvenanceCheck"]()
    args = dict(bundle="studio-refs", on_match="warn", fail_mode="open", use_bundle_thresholds=True, warn=0.9,
                block=0.95, top_k=3, extra_pnginfo={"workflow": {}}, prompt={}, unique_id="10")
    args.update(kw)
    out = getattr(node, node.FUNCTION)(images, **args)
    return out, args["extra_pnginfo"]


def test_node_contract(pack, comfy):
    assert hasattr(pack, "NODE_CLASS_MAPPINGS") and hasattr(pack, "NODE_DISPLAY_NAME_MAPPINGS")
    cls = pack.NODE_CLASS_MAPPINGS["ProvenanceCheck"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["ProvenanceCheck"] == "Provenance Check"
    assert cls.CATEGORY == "provenance" and cls.FUNCTION == "check" and hasattr(cls, cls.FUNCTION)
    assert cls.RETURN_TYPES == ("IMAGE", "BOOLEAN", "FLOAT", "STRING")
    assert len(cls.RETURN_NAMES) == len(cls.OUTPUT_IS_LIST) == 4
    spec = cls.INPUT_TYPES()
    assert spec["required"]["images"][0] == "IMAGE"
    assert spec["required"]["bundle"][0] == ["studio-refs"]
    assert spec["required"]["on_match"][0] == ["warn", "block", "replace", "error"]
    assert spec["optional"]["clip_vision"][0] == "CLIP_VISION"
    assert spec["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"}
    web = ROOT / pack.WEB_DIRECTORY
    assert (web / "provenance.js").is_file()
    # models/provenance was registered with folder_paths at load.
    assert comfy.paths["provenance"][0] == [str(comfy.models / "provenance")]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "[tool.comfy]" in pyproject and "PublisherId" in pyproject


def test_warn_passes_everything_and_records(pack):
    images = tensor("astronaut", "camera")
    out, extra = run(pack, images)
    result_images, flagged, scores, report = out["result"]
    assert result_images is images and flagged == [True, False]
    assert scores[0] >= 0.999 and scores[1] < 0.985
    assert "image 0: BLOCK" in report and "astronaut.png" in report
    ui = out["ui"]["provenance"][0]
    assert ui["verdict"] == "block" and ui["images"][0]["matches"][0]["url"] == "astronaut.png"
    record = extra["provenance"]
    assert record["schema"] == BATCH_SCHEMA and len(record["records"]) == 2
    assert record["records"][0]["verdict"] == "block" and record["records"][0]["image"]["pixels_sha256"]
    json.dumps(extra)  # Save Image json.dumps every value


def test_block_drops_flagged_images_and_blocks_when_none_left(pack):
    out, extra = run(pack, tensor("astronaut", "camera", "coins"), on_match="block")
    images, flagged, _, _ = out["result"]
    assert flagged == [True, False, False] and tuple(images.shape[:1]) == (2,)
    assert len(extra["provenance"]["records"]) == 2  # the records of the images that will be saved
    out, extra = run(pack, tensor("astronaut"), on_match="block")
    blocker = out["result"][0]
    assert isinstance(blocker, ExecutionBlocker) and "astronaut.png" in blocker.message
    assert "provenance" not in extra


def test_replace_blacks_out_flagged_images(pack):
    images = tensor("astronaut", "camera")
    out, extra = run(pack, images, on_match="replace")
    result = out["result"][0]
    assert torch.all(result[0] == 0) and torch.equal(result[1], images[1])
    assert torch.any(images[0] != 0)  # the input tensor is not modified
    assert extra["provenance"]["records"][0]["verdict"] == "block"


def test_error_names_the_closest_match(pack):
    with pytest.raises(RuntimeError, match=r"astronaut\.png.*Try another seed"):
        run(pack, tensor("camera", "astronaut"), on_match="error")
    out, _ = run(pack, tensor("camera"), on_match="error")
    assert out["result"][1] == [False]


@pytest.mark.parametrize("mode,verdict", [("open", "unchecked"), ("closed", "block")])
def test_fail_modes_when_the_bundle_is_missing(pack, comfy, mode, verdict):
    shutil.rmtree(comfy.models / "provenance" / "studio-refs")
    images = tensor("camera")
    out, extra = run(pack, images, fail_mode=mode, on_match="block")
    if mode == "open":
        assert out["result"][0] is images and out["result"][1] == [False]
        assert "UNCHECKED" in out["result"][3] and "no longer in models/provenance" in out["result"][3]
        assert extra["provenance"]["verdict"] == "unchecked"
    else:
        assert isinstance(out["result"][0], ExecutionBlocker) and out["result"][1] == [True]


def test_user_thresholds_and_bundle_path(pack, built_bundle):
    out, _ = run(pack, tensor("camera"), bundle="(no bundle in models/provenance)", bundle_path=str(built_bundle),
                 use_bundle_thresholds=False, warn=-1.0, block=-1.0)
    assert out["result"][1] == [True] and out["ui"]["provenance"][0]["verdict"] == "block"


def test_large_batch_reports_progress(pack):
    images = tensor(*(["camera"] * 20), size=64)
    out, _ = run(pack, images)
    assert len(out["result"][1]) == 20
    assert sum(v for _, v, _ in ProgressBar.updates) == 20 and ProgressBar.updates[0][0] == "10"


def test_is_changed_is_never_nan(pack, comfy):
    cls = pack.NODE_CLASS_MAPPINGS["ProvenanceCheck"]
    a = cls.IS_CHANGED(images=None, bundle="studio-refs")
    assert isinstance(a, str) and a == cls.IS_CHANGED(images=None, bundle="studio-refs")
    manifest = comfy.models / "provenance" / "studio-refs" / "manifest.json"
    manifest.write_text(manifest.read_text())  # a new version on disk re-runs the check
    import os

    os.utime(manifest, ns=(1, 1))
    assert cls.IS_CHANGED(images=None, bundle="studio-refs") != a
    broken = cls.IS_CHANGED(images=None, bundle="gone", bundle_path="")
    assert isinstance(broken, str) and "nan" not in broken.lower()
    assert not (isinstance(broken, float) and math.isnan(broken))


def test_studio_enforcement_inserts_a_blocking_check(pack, comfy, monkeypatch):
    from provenance_guard.comfyui_nodes.enforce import enforce_prompt, load_config

    monkeypatch.setenv("PROVENANCE_GUARD_ENFORCE", "studio-refs")
    config = load_config(None)
    assert config["fail_mode"] == "closed"
    graph = json.loads((ROOT / "examples/txt2img_provenance_api.json").read_text())
    graph["11"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "raw"}}
    data = enforce_prompt({"prompt": graph, "client_id": "x"}, config)
    enforced = [k for k in data["prompt"] if k.startswith("provenance-guard-enforce-")]
    assert sorted(enforced) == ["provenance-guard-enforce-11", "provenance-guard-enforce-9"]
    check = data["prompt"]["provenance-guard-enforce-11"]
    assert check["class_type"] == "ProvenanceCheck" and check["inputs"]["on_match"] == "block"
    assert check["inputs"]["images"] == ["8", 0] and check["inputs"]["fail_mode"] == "closed"
    assert data["prompt"]["11"]["inputs"]["images"] == ["provenance-guard-enforce-11", 0]
    assert enforce_prompt(data, config) == data  # idempotent
    # A graph the handler cannot rewrite is refused, never let through.
    bad = {"prompt": {"9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}}}}
    monkeypatch.setattr("provenance_guard.comfyui_nodes.enforce._is_path", lambda b: 1 / 0)
    assert enforce_prompt(bad, config)["prompt"]["9"]["inputs"]["images"] == ["provenance-guard-enforce-failed", 0]


def test_record_slot_for_api_clients_without_extra_data(pack):
    from provenance_guard.comfyui_nodes.enforce import record_slot

    assert pack.NODE_CLASS_MAPPINGS  # what ComfyUI reads at load, which registers the handlers
    graph = json.loads((ROOT / "examples/txt2img_provenance_api.json").read_text())
    assert record_slot({"prompt": graph})["extra_data"] == {"extra_pnginfo": {}}
    kept = {"prompt": graph, "extra_data": {"extra_pnginfo": {"workflow": {"x": 1}}}}
    assert record_slot(kept)["extra_data"]["extra_pnginfo"] == {"workflow": {"x": 1}}
    assert "extra_data" not in record_slot({"prompt": {"1": {"class_type": "SaveImage", "inputs": {}}}})
    assert len(PromptServer.instance.on_prompt_handlers) == 1  # registered at load, enforcement off


def test_enforcement_registers_a_prompt_handler_at_load(comfy, monkeypatch):
    (comfy.tmp / "user").mkdir()
    (comfy.tmp / "user" / "provenance_guard.json").write_text(json.dumps({"enforce": {"bundle": "studio-refs"}}))
    name = f"{comfy.tmp}/custom_nodes/provenance-guard-enforced"
    try:
        module = load_pack(name)
        assert module.NODE_CLASS_MAPPINGS  # ComfyUI reading the mappings runs the registration
        handlers = PromptServer.instance.on_prompt_handlers
        assert len(handlers) == 2  # enforcement, then the record slot
        data = {"prompt": {"9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}}}}
        for handler in handlers:
            data = handler(data)
        assert data["prompt"]["9"]["inputs"]["images"] == ["provenance-guard-enforce-9", 0]
        assert data["extra_data"]["extra_pnginfo"] == {}  # where the inserted check puts its record
    finally:
        for key in [k for k in sys.modules if k.startswith(name)]:
            del sys.modules[key]


class FakeClipVision:
    """Shaped like comfy.clip_vision.ClipVisionModel of OpenAI's ViT-B-32, embedding with the tiny model."""

    def __init__(self, embedder):
        activations = sys.modules["comfy.clip_model"].ACTIVATIONS  # the stand-in the test installs
        self.embedder = embedder
        self.image_size = 224
        layer = types.SimpleNamespace(mlp=types.SimpleNamespace(activation=activations["quick_gelu"]))
        conv = types.SimpleNamespace(out_channels=768, kernel_size=(32, 32))
        vision = types.SimpleNamespace(embeddings=types.SimpleNamespace(patch_embedding=conv),
                                       encoder=types.SimpleNamespace(layers=[layer] * 12))
        self.model = types.SimpleNamespace(vision_model=vision, visual_projection=types.SimpleNamespace(out_features=512))
        self.calls = 0

    def encode_image(self, image, crop=True):
        self.calls += 1
        from provenance_guard.core.images import to_pixels

        vec = self.embedder.embed_pixels(to_pixels(image))
        return {"image_embeds": torch.from_numpy(vec)}


def test_clip_vision_input_is_used_when_it_is_the_bundle_model(pack, comfy, tiny_model, monkeypatch):
    from provenance_guard.core.embed import get_embedder

    clip_model = types.ModuleType("comfy.clip_model")
    clip_model.ACTIVATIONS = {"quick_gelu": lambda a: a, "gelu": lambda a: a}
    monkeypatch.setitem(sys.modules, "comfy.clip_model", clip_model)
    manifest = comfy.models / "provenance" / "studio-refs" / "manifest.json"
    fake = FakeClipVision(get_embedder(tiny_model, "cpu"))
    # The bundle says it was made with ViT-L-14/openai: the connected ViT-B-32 is refused, clearly.
    data = json.loads(manifest.read_text())
    data["embedding"]["model"] = "ViT-L-14/openai"
    manifest.write_text(json.dumps(data))
    out, _ = run(pack, tensor("astronaut"), clip_vision=fake, fail_mode="open")
    assert out["result"][1] == [False] and "is ViT-B-32/openai but the bundle was made with ViT-L-14" in out["result"][3]
    assert fake.calls == 0
    data["embedding"]["model"] = "ViT-B-32/openai"
    manifest.write_text(json.dumps(data))
    out, _ = run(pack, tensor("astronaut", "camera"), clip_vision=fake)
    assert out["result"][1] == [True, False] and fake.calls == 2


def test_loading_the_pack_loads_no_model_or_index():
    code = (
        "import importlib.util, sys, types\n"
        f"spec = importlib.util.spec_from_file_location('custom_nodes/provenance-guard', {str(ROOT / '__init__.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)\n"
        "assert m.NODE_CLASS_MAPPINGS['ProvenanceCheck'].INPUT_TYPES()\n"
        "bad = [x for x in ('faiss', 'open_clip', 'torch', 'pyarrow') if x in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_takedown_applies_to_the_next_run_without_a_restart(pack, comfy):
    from provenance_guard.index_builder.maintain import remove_rows

    out, _ = run(pack, tensor("astronaut"), on_match="warn")
    top = out["ui"]["provenance"][0]["images"][0]["matches"][0]
    assert out["result"][1] == [True] and top["url"] == "astronaut.png"
    remove_rows(comfy.models / "provenance" / "studio-refs", urls=["astronaut.png"], reason="opt-out")
    out, _ = run(pack, tensor("astronaut"), on_match="warn")
    urls = [m["url"] for m in out["ui"]["provenance"][0]["images"][0]["matches"]]
    assert out["result"][1] == [False] and "astronaut.png" not in urls
