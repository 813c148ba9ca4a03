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

from provenance_guard.core.record import BATCH_SCHEMA, png_text_chunks, read_record
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


def node_class(name, inputs, returns=(), output=False):
    """A node class as ComfyUI declares one: INPUT_TYPES, RETURN_TYPES, OUTPUT_NODE."""
    return type(name, (), {"INPUT_TYPES": classmethod(lambda cls: {"required": inputs}), "RETURN_TYPES": returns,
                           "OUTPUT_NODE": output})


# ComfyUI v0.3.64's built-in nodes as far as enforcement looks at them (nodes.py, comfy_extras/).
BUILTIN_NODES = {
    "CheckpointLoaderSimple": node_class("CheckpointLoaderSimple", {"ckpt_name": (["a"],)}, ("MODEL", "CLIP", "VAE")),
    "KSampler": node_class("KSampler", {"model": ("MODEL",)}, ("LATENT",)),
    "VAEDecode": node_class("VAEDecode", {"samples": ("LATENT",), "vae": ("VAE",)}, ("IMAGE",)),
    "CLIPTextEncode": node_class("CLIPTextEncode", {"text": ("STRING",)}, ("CONDITIONING",)),
    "EmptyLatentImage": node_class("EmptyLatentImage", {"width": ("INT",)}, ("LATENT",)),
    "SaveImage": node_class("SaveImage", {"images": ("IMAGE",), "filename_prefix": ("STRING",)}, output=True),
    "PreviewImage": node_class("PreviewImage", {"images": ("IMAGE",)}, output=True),
    "SaveAnimatedWEBP": node_class("SaveAnimatedWEBP", {"images": ("IMAGE",), "fps": ("FLOAT",)}, output=True),
    "SaveImageWebsocket": node_class("SaveImageWebsocket", {"images": ("IMAGE",)}, output=True),
    "PreviewAny": node_class("PreviewAny", {"source": ("*",)}, output=True),
    "MyStudioSaver": node_class("MyStudioSaver", {"pictures": ("IMAGE",), "caption": ("STRING",)}, output=True),
    "CreateVideo": node_class("CreateVideo", {"images": ("IMAGE",), "fps": ("FLOAT",)}, ["VIDEO"]),
    "SaveVideo": node_class("SaveVideo", {"video": ("VIDEO",), "filename_prefix": ("STRING",)}, [], output=True),
    "SaveWEBM": node_class("SaveWEBM", {"images": ("IMAGE",), "fps": ("FLOAT",)}, [], output=True),
    "LoadVideo": node_class("LoadVideo", {"file": (["a.mp4"],)}, ["VIDEO"]),
    "GetVideoComponents": node_class("GetVideoComponents", {"video": ("VIDEO",)}, ["IMAGE", "AUDIO", "FLOAT"]),
    "ImageToMask": node_class("ImageToMask", {"image": ("IMAGE",), "channel": (["red"],)}, ("MASK",)),
    "MaskPreview": node_class("MaskPreview", {"mask": ("MASK",)}, output=True),
    "SolidMask": node_class("SolidMask", {"value": ("FLOAT",)}, ("MASK",)),
    "SaveLatent": node_class("SaveLatent", {"samples": ("LATENT",), "filename_prefix": ("STRING",)}, output=True),
    "Make3D": node_class("Make3D", {"image": ("IMAGE",)}, ("MESH",)),
    "Save3D": node_class("Save3D", {"mesh": ("MESH",)}, output=True),
}


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
    nodes_mod = types.ModuleType("nodes")
    nodes_mod.NODE_CLASS_MAPPINGS = dict(BUILTIN_NODES)
    for name, mod in {"folder_paths": fp, "comfy_execution": comfy_execution,
                      "comfy_execution.graph_utils": graph_utils, "server": server, "comfy": comfy_pkg,
                      "comfy.utils": utils, "comfy.model_management": mm, "nodes": nodes_mod}.items():
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
                 use_bundle_thresholds=False, warn=-1.0, block=-1.0, verify="off")
    assert out["result"][1] == [True] and out["ui"]["provenance"][0]["verdict"] == "block"


def test_the_node_verifies_on_pixels_and_shows_the_evidence(pack, built_bundle):
    """verify=confirm (the node's default): a score-only block that the pixels contradict becomes warn; a
    real copy keeps its block and the node shows both images side by side."""
    out, extra = run(pack, tensor("camera"), use_bundle_thresholds=False, warn=-1.0, block=-1.0)
    (image,) = out["ui"]["provenance"][0]["images"]
    assert out["result"][1] == [False] and image["verdict"] == "warn"
    assert image["matches"][0]["verification"]["status"] == "different"
    assert any("not a copy" in w for w in image["warnings"])
    out, extra = run(pack, tensor("astronaut", size=256), on_match="block")
    (image,) = out["ui"]["provenance"][0]["images"]
    top = image["matches"][0]
    assert image["verdict"] == "block" and top["verification"]["status"] == "copy"
    assert top["evidence"].startswith("data:image/jpeg;base64,") and "matched points" in top["verification"]["summary"]
    assert "evidence" not in json.dumps(extra.get("provenance", {}))  # the record stays small


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


def enforced(config_env=None, graph=None, config=None):
    from provenance_guard.comfyui_nodes.enforce import enforce_prompt, load_config

    config = config or load_config(None, environ={"PROVENANCE_GUARD_ENFORCE": config_env or "studio-refs"})
    return enforce_prompt({"prompt": graph, "client_id": "x"}, config, BUILTIN_NODES)["prompt"], config


def example_graph():
    return json.loads((ROOT / "examples/txt2img_provenance_api.json").read_text())


def test_studio_enforcement_guards_every_output_node_that_receives_images(pack):
    graph = example_graph()
    graph["11"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "raw"}}
    graph["12"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    graph["13"] = {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["8", 0], "fps": 6.0}}
    graph["14"] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["8", 0]}}
    graph["15"] = {"class_type": "PreviewAny", "inputs": {"source": ["8", 0]}}  # an IMAGE into a "*" input
    graph["16"] = {"class_type": "MyStudioSaver", "inputs": {"pictures": ["8", 0], "caption": ["6", 0]}}
    graph["17"] = {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}}  # conditioning: not an image
    prompt, config = enforced(graph=graph)
    assert config["fail_mode"] == "closed"
    for node_id, key in (("11", "images"), ("12", "images"), ("13", "images"), ("14", "images"), ("15", "source"),
                         ("16", "pictures")):
        check_id = prompt[node_id]["inputs"][key][0]
        check = prompt[check_id]
        assert check["class_type"] == "ProvenanceCheck" and check["inputs"]["images"] == ["8", 0], node_id
        assert check["inputs"]["on_match"] == "block" and check["inputs"]["fail_mode"] == "closed"
    assert prompt["16"]["inputs"]["caption"] == ["6", 0] and prompt["17"]["inputs"]["source"] == ["6", 0]
    again, _ = enforced(graph=json.loads(json.dumps(prompt)))
    assert again == prompt  # idempotent: the inserted checks count as enforcing


def test_exempt_nodes_are_named_explicitly(pack):
    from provenance_guard.comfyui_nodes.enforce import load_config

    config = dict(load_config(None, environ={"PROVENANCE_GUARD_ENFORCE": "studio-refs"}), exempt_nodes=["PreviewImage"])
    graph = example_graph()
    graph["12"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    prompt, _ = enforced(graph=graph, config=config)
    assert prompt["12"]["inputs"]["images"] == ["8", 0]
    assert prompt["9"]["inputs"]["images"][0].startswith("provenance-guard-enforce-")


def _enforced_inputs(**changes):
    from provenance_guard.comfyui_nodes.enforce import check_inputs, load_config

    config = load_config(None, environ={"PROVENANCE_GUARD_ENFORCE": "studio-refs"})
    return {**check_inputs(config, ["8", 0]), **changes}


@pytest.mark.parametrize("upstream,trusted", [
    ({"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}, False),  # an id is no proof
    ({"class_type": "ProvenanceCheck", "inputs": _enforced_inputs(on_match="warn")}, False),
    ({"class_type": "ProvenanceCheck", "inputs": _enforced_inputs(use_bundle_thresholds=False, warn=1.0, block=1.0)},
     False),
    ({"class_type": "ProvenanceCheck", "inputs": _enforced_inputs(bundle="other")}, False),
    ({"class_type": "ProvenanceCheck", "inputs": _enforced_inputs(verify="off")}, False),
    # a decoy: every setting as enforced, but its pixel check looks in a folder of the user's choosing
    ({"class_type": "ProvenanceCheck", "inputs": _enforced_inputs(references="/tmp/decoy")}, False),
    ({"class_type": "ProvenanceCheck", "inputs": _enforced_inputs(fetch_references=True)}, False),
    ({"class_type": "ProvenanceCheck", "inputs": _enforced_inputs(prompt_action="pass")}, False),
    ({"class_type": "ProvenanceCheck", "inputs": _enforced_inputs(use_bundle_thresholds=1)}, False),  # type counts
    ({"class_type": "ProvenanceCheck", "inputs": {**_enforced_inputs(), "added_later": "x"}}, False),
    ({"class_type": "ProvenanceCheck", "inputs": _enforced_inputs(views="multi")}, False),  # not the enforced views
    # saved before the views input existed: it runs with the node's default, which is enforcement's here
    ({"class_type": "ProvenanceCheck", "inputs": {k: v for k, v in _enforced_inputs().items() if k != "views"}},
     True),
    # without strict: enforcement makes every check strict first, and then it is the enforced check
    ({"class_type": "ProvenanceCheck", "inputs": {k: v for k, v in _enforced_inputs().items() if k != "strict"}},
     True),
    ({"class_type": "ProvenanceCheck", "inputs": _enforced_inputs()}, True),
])
def test_already_enforced_means_every_input_as_enforcement_sets_it(pack, upstream, trusted):
    graph = example_graph()
    graph["provenance-guard-enforce-9"] = upstream
    graph["9"]["inputs"]["images"] = ["provenance-guard-enforce-9", 0]
    prompt, _ = enforced(graph=graph)
    assert (prompt["9"]["inputs"]["images"] == ["provenance-guard-enforce-9", 0]) == trusted
    if upstream["class_type"] == "ProvenanceCheck":
        assert prompt["provenance-guard-enforce-9"]["inputs"]["strict"] is True  # the user's check too


def test_video_and_mask_outputs_are_checked_where_the_frames_are_still_images(pack):
    graph = example_graph()
    graph["20"] = {"class_type": "CreateVideo", "inputs": {"images": ["8", 0], "fps": 8.0}}
    graph["21"] = {"class_type": "SaveVideo", "inputs": {"video": ["20", 0], "filename_prefix": "video/x"}}
    graph["22"] = {"class_type": "ImageToMask", "inputs": {"image": ["8", 0], "channel": "red"}}
    graph["23"] = {"class_type": "MaskPreview", "inputs": {"mask": ["22", 0]}}
    graph["24"] = {"class_type": "SaveWEBM", "inputs": {"images": ["8", 0], "fps": 8.0}}
    graph["25"] = {"class_type": "SolidMask", "inputs": {"value": 1.0}}
    graph["26"] = {"class_type": "MaskPreview", "inputs": {"mask": ["25", 0]}}  # no image data: runs as it is
    prompt, _ = enforced(graph=graph)
    for node_id, key in (("20", "images"), ("22", "image"), ("24", "images")):
        check = prompt[prompt[node_id]["inputs"][key][0]]
        assert check["class_type"] == "ProvenanceCheck" and check["inputs"]["images"] == ["8", 0], node_id
        assert check["inputs"]["on_match"] == "block" and check["inputs"]["strict"] is True
    assert prompt["21"]["inputs"]["video"] == ["20", 0] and prompt["23"]["inputs"]["mask"] == ["22", 0]
    assert prompt["26"]["inputs"]["mask"] == ["25", 0]
    again, _ = enforced(graph=json.loads(json.dumps(prompt)))
    assert again == prompt


@pytest.mark.parametrize("nodes,why", [
    ({"20": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "l"}}},
     "receives LATENT"),
    ({"20": {"class_type": "LoadVideo", "inputs": {"file": "a.mp4"}},
      "21": {"class_type": "SaveVideo", "inputs": {"video": ["20", 0], "filename_prefix": "v"}}},
     "made from no image this graph can check"),
    ({"20": {"class_type": "Make3D", "inputs": {"image": ["8", 0]}},
      "21": {"class_type": "Save3D", "inputs": {"mesh": ["20", 0]}}}, '"image_types"'),
])
def test_outputs_whose_data_cannot_be_checked_refuse_the_prompt(pack, nodes, why):
    graph = example_graph()
    graph.update(nodes)
    prompt, _ = enforced(graph=graph)
    reason = refusal_reason(prompt)
    assert "refused this prompt" in reason and why in reason, reason


@pytest.mark.parametrize("slot", [-1, True, False, 1.0, "0"])
def test_a_link_to_an_output_slot_that_is_no_plain_index_is_refused(pack, slot):
    """ComfyUI reads RETURN_TYPES[slot] with Python's rules (-1 is the last output, True is 1): a link typed
    by any other rule than ComfyUI's would let an image reach an output unchecked."""
    graph = example_graph()
    graph["20"] = {"class_type": "PreviewAny", "inputs": {"source": ["8", slot]}}
    prompt, _ = enforced(graph=graph)
    assert "not a plain output index" in refusal_reason(prompt)


@pytest.mark.parametrize("key,name", [("data_types", "LATENT"), ("data_types", "IMAGE"), ("image_types", "*"),
                                      ("data_types", "VIDEO")])
def test_a_studio_cannot_reclassify_the_types_enforcement_decides(key, name):
    from provenance_guard.comfyui_nodes.enforce import EnforcementConfigError, _validated, DEFAULTS

    with pytest.raises(EnforcementConfigError, match="own types only"):
        _validated({**DEFAULTS, "bundle": "x", key: [name]}, "provenance_guard.json")


def test_a_packs_own_types_are_classified_by_the_studio(pack):
    from provenance_guard.comfyui_nodes.enforce import load_config

    base = load_config(None, environ={"PROVENANCE_GUARD_ENFORCE": "studio-refs"})
    graph = example_graph()
    graph["20"] = {"class_type": "Make3D", "inputs": {"image": ["8", 0]}}
    graph["21"] = {"class_type": "Save3D", "inputs": {"mesh": ["20", 0]}}
    traced, _ = enforced(graph=json.loads(json.dumps(graph)), config=dict(base, image_types=["MESH"]))
    assert traced["20"]["inputs"]["image"][0].startswith("provenance-guard-enforce-20-image")
    free, _ = enforced(graph=json.loads(json.dumps(graph)), config=dict(base, data_types=["MESH"]))
    assert free["20"]["inputs"]["image"] == ["8", 0] and free["21"]["inputs"]["mesh"] == ["20", 0]
    exempt, _ = enforced(graph=json.loads(json.dumps(graph)), config=dict(base, exempt_nodes=["Save3D"]))
    assert exempt["21"]["inputs"]["mesh"] == ["20", 0]


def test_enforcement_turns_latent_previews_off(pack, monkeypatch):
    import enum

    class LatentPreviewMethod(enum.Enum):
        NoPreviews = "none"
        Auto = "auto"

    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.LatentPreviewMethod = LatentPreviewMethod
    cli_args.args = types.SimpleNamespace(preview_method=LatentPreviewMethod.Auto)
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    enforced(graph=example_graph())
    assert cli_args.args.preview_method is LatentPreviewMethod.NoPreviews


def refusal_reason(prompt) -> str:
    from provenance_guard.comfyui_nodes.enforce import ProvenanceGuardRefusal

    (node,) = prompt.values()
    assert node["class_type"] == "ProvenanceGuardRefusal"
    return ProvenanceGuardRefusal.VALIDATE_INPUTS(**node["inputs"])  # what ComfyUI's validation reports


def test_a_graph_enforcement_cannot_rewrite_is_refused_with_the_reason(pack, monkeypatch):
    monkeypatch.setattr("provenance_guard.comfyui_nodes.enforce.check_inputs", lambda *a: 1 / 0)
    prompt, _ = enforced(graph=example_graph())
    assert "could not insert its check" in refusal_reason(prompt) and "ZeroDivisionError" in refusal_reason(prompt)


@pytest.mark.parametrize("text,why", [
    ('{"enforce": {"bundle": "studio-refs"', "cannot be read as JSON"),
    ('["studio-refs"]', "must hold a JSON object"),
    ('{"enforce": "studio"}', '"enforce" must be an object'),
    ('{"enforce": {"bundle": "studio-refs", "save_nodes": "SaveImage"}}', '"save_nodes" must be a list'),
    ('{"enforce": {"bundle": "studio-refs", "fail_mode": "clsoed"}}', '"fail_mode" must be'),
    ('{"enforce": {"bundle": "studio-refs", "exempt": ["SaveImage"]}}', "unknown key"),
    # configured (the file exists) but without a usable "enforce" object: refused, never silently off
    ('{"enforcement": {"bundle": "studio-refs"}}', 'holds no "enforce" object'),
    ('{}', 'holds no "enforce" object'),
    ('{"enforce": null}', 'holds no "enforce" object'),
    ('{"enforce": {"bundle": "studio-refs"}, "enforcement": {}}', 'beside "enforce"'),
    ('{"enforce": {"bundle": "studio-refs", "image_types": "MESH"}}', '"image_types" must be a list'),
    ('{"enforce": {"bundle": "studio-refs", "views": "many"}}', '"views" must be one of'),
    ('{"enforce": {"bundle": "studio-refs", "views": ["multi"]}}', '"views" must be one of'),
    ('{"enforce": {"bundle": "studio-refs", "views": null}}', '"views" must be one of'),
])
@pytest.mark.parametrize("env", [None, "studio-refs"])
def test_a_configuration_that_cannot_be_used_refuses_every_prompt(comfy, monkeypatch, text, why, env):
    (comfy.tmp / "user").mkdir()
    (comfy.tmp / "user" / "provenance_guard.json").write_text(text)
    if env:
        monkeypatch.setenv("PROVENANCE_GUARD_ENFORCE", env)
    name = f"{comfy.tmp}/custom_nodes/provenance-guard-misconfigured"
    try:
        module = load_pack(name)
        assert module.NODE_CLASS_MAPPINGS and "ProvenanceGuardRefusal" in module.NODE_CLASS_MAPPINGS
        data = {"prompt": example_graph()}
        for handler in PromptServer.instance.on_prompt_handlers:
            data = handler(data)
        reason = refusal_reason(data["prompt"])
        assert why in reason and "Every prompt is refused" in reason
    finally:
        for key in [k for k in sys.modules if k.startswith(name)]:
            del sys.modules[key]


def test_an_empty_bundle_is_refused_and_the_variable_overrides_the_file(comfy):
    from provenance_guard.comfyui_nodes.enforce import EnforcementConfigError, load_config

    (comfy.tmp / "user").mkdir()
    (comfy.tmp / "user" / "provenance_guard.json").write_text('{"enforce": {"bundle": ""}}')
    with pytest.raises(EnforcementConfigError, match='"bundle" must name'):
        load_config(str(comfy.tmp / "user"), environ={})
    assert load_config(str(comfy.tmp / "user"), environ={"PROVENANCE_GUARD_ENFORCE": "x"})["bundle"] == "x"
    with pytest.raises(EnforcementConfigError, match="set but empty"):
        load_config(None, environ={"PROVENANCE_GUARD_ENFORCE": ""})
    (comfy.tmp / "user" / "provenance_guard.json").write_text('{"enforce": {}}')  # configured, names no bundle
    with pytest.raises(EnforcementConfigError, match='"bundle" must name'):
        load_config(str(comfy.tmp / "user"), environ={})
    assert load_config(str(comfy.tmp / "user"), environ={"PROVENANCE_GUARD_ENFORCE": "x"})["bundle"] == "x"


def test_enforced_views_go_into_every_inserted_check(comfy):
    """"views" in provenance_guard.json: "whole" unless set; "multi" goes into every check enforcement inserts,
    and a check left without the input (the node's default, whole) no longer counts as the enforced one."""
    from provenance_guard.comfyui_nodes.enforce import load_config

    (comfy.tmp / "user").mkdir()
    path = comfy.tmp / "user" / "provenance_guard.json"
    path.write_text(json.dumps({"enforce": {"bundle": "studio-refs"}}))
    assert load_config(str(comfy.tmp / "user"), environ={})["views"] == "whole"
    path.write_text(json.dumps({"enforce": {"bundle": "studio-refs", "views": "multi"}}))
    config = load_config(str(comfy.tmp / "user"), environ={})
    assert config["views"] == "multi"
    prompt, _ = enforced(graph=example_graph(), config=config)
    checks = [n for k, n in prompt.items() if k.startswith("provenance-guard-enforce-")]
    assert checks and all(n["inputs"]["views"] == "multi" for n in checks)
    graph = example_graph()
    old = {k: v for k, v in checks[0]["inputs"].items() if k != "views"}
    graph["provenance-guard-enforce-9"] = {"class_type": "ProvenanceCheck", "inputs": {**old, "images": ["8", 0]}}
    graph["9"]["inputs"]["images"] = ["provenance-guard-enforce-9", 0]
    prompt, _ = enforced(graph=graph, config=config)
    assert prompt["9"]["inputs"]["images"] != ["provenance-guard-enforce-9", 0]  # an enforced check went in front


def test_a_config_file_with_a_utf8_bom_is_enforced(comfy):
    from provenance_guard.comfyui_nodes.enforce import load_config

    (comfy.tmp / "user").mkdir()
    (comfy.tmp / "user" / "provenance_guard.json").write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"enforce": {"bundle": "studio-refs"}}).encode())
    assert load_config(str(comfy.tmp / "user"), environ={})["bundle"] == "studio-refs"
    assert load_config(str(comfy.tmp / "nowhere"), environ={}) is None  # not configured: off


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
        data = {"prompt": {"8": {"class_type": "VAEDecode", "inputs": {}},
                           "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}}}}
        for handler in handlers:
            data = handler(data)
        assert data["prompt"]["9"]["inputs"]["images"] == ["provenance-guard-enforce-9-images", 0]
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
    from provenance_guard.core.fingerprint import probe_pixels

    out, _ = run(pack, tensor("astronaut", "camera"), clip_vision=fake)
    probes = len(probe_pixels())  # the bundle's model fingerprint, checked once per loaded model
    assert out["result"][1] == [True, False] and fake.calls == 2 + probes
    run(pack, tensor("camera", "astronaut"), clip_vision=fake)
    assert fake.calls == 4 + probes


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


def test_the_record_links_prompt_to_output_through_the_graph(pack):
    """The hidden PROMPT is traced upstream from this node to its sampler, text encoders and model."""
    graph = example_graph()
    graph["20"] = {"class_type": "KSampler", "inputs": {"seed": 7, "steps": 4, "cfg": 3.0, "sampler_name": "dpm",
                                                         "scheduler": "karras", "model": ["4", 0],
                                                         "positive": ["7", 0], "negative": ["6", 0],
                                                         "latent_image": ["5", 0]}}
    graph["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["4", 2]}}
    (out, extra) = run(pack, tensor("astronaut"), prompt=graph, unique_id="10")
    gen = extra["provenance"]["generation"]
    assert gen["prompt"] == "a portrait photo of an astronaut, studio lighting" and gen["negative_prompt"] == "text, watermark"
    assert (gen["seed"], gen["steps"], gen["cfg"], gen["sampler"], gen["scheduler"]) == (156680208700286, 20, 7.0,
                                                                                         "euler", "normal")
    assert gen["model"] == "v1-5-pruned-emaonly.safetensors" and gen["source"] == "comfyui"
    # A second check fed by the other sampler records that sampler, not the graph's first one.
    graph["22"] = {"class_type": "ProvenanceCheck", "inputs": {"images": ["21", 0]}}
    (_, extra) = run(pack, tensor("camera"), prompt=graph, unique_id="22")
    gen = extra["provenance"]["generation"]
    assert (gen["seed"], gen["prompt"], gen["negative_prompt"]) == (7, "text, watermark",
                                                                    "a portrait photo of an astronaut, studio lighting")


def test_custom_sampler_graphs_are_traced_too(pack):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                     "cfg": 5.5}},
        "5": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "6": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}},
        "7": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": 12}},
        "8": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["5", 0], "guider": ["4", 0],
                                                                 "sampler": ["6", 0], "sigmas": ["7", 0],
                                                                 "latent_image": ["9", 0]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "11": {"class_type": "ProvenanceCheck", "inputs": {"images": ["10", 0]}},
    }
    (_, extra) = run(pack, tensor("camera"), prompt=graph, unique_id="11")
    gen = extra["provenance"]["generation"]
    assert (gen["prompt"], gen["negative_prompt"], gen["seed"], gen["cfg"], gen["steps"]) == ("a lighthouse", "blurry",
                                                                                              0, 5.5, 12)
    assert (gen["sampler"], gen["scheduler"], gen["model"]) == ("euler_ancestral", "simple", "sd15.safetensors")


def test_fail_closed_withholds_an_unchecked_image_even_with_on_match_warn(pack, comfy):
    out, extra = run(pack, tensor("camera"), bundle_path=str(comfy.tmp / "gone"), on_match="warn",
                     fail_mode="closed")
    images, flagged, scores, report = out["result"]
    assert isinstance(images, ExecutionBlocker) and flagged == [True] and "provenance" not in extra
    out, _ = run(pack, tensor("camera"), bundle_path=str(comfy.tmp / "gone"), on_match="warn", fail_mode="open")
    assert torch.is_tensor(out["result"][0]) and out["result"][1] == [False]


NO_BUNDLE = "(no bundle in models/provenance)"


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_a_bundle_url_is_pulled_once_into_models_provenance_and_reused(pack, comfy, built_bundle, mode):
    """bundle_url: the first run starts the download in the background and fails under fail_mode (never a
    silent pass, never a frozen prompt); once it is there the check runs on it; later runs, and a restart,
    reuse it without asking the server again."""
    import threading

    from test_pull import BundleServer, published_copy

    published_copy(built_bundle, comfy.tmp / "pub", "pulled")
    server = BundleServer(comfy.tmp / "pub" / "site")
    server.gate = threading.Event()  # the server holds every answer: the download is in progress
    url = f"{server.url}/bundles/pulled/"
    cls = pack.NODE_CLASS_MAPPINGS["ProvenanceCheck"]
    try:
        images = tensor("astronaut")
        out, extra = run(pack, images, bundle=NO_BUNDLE, bundle_url=url, fail_mode=mode, on_match="block")
        report = out["result"][3]
        assert "bundle downloading from" in report and "the check runs when it finishes" in report
        if mode == "open":
            assert out["result"][0] is images and extra["provenance"]["verdict"] == "unchecked"
        else:
            assert isinstance(out["result"][0], ExecutionBlocker) and out["result"][1] == [True]
        # not cached by ComfyUI while it downloads: every queue runs the check again
        assert cls.IS_CHANGED(bundle=NO_BUNDLE, bundle_url=url) != cls.IS_CHANGED(bundle=NO_BUNDLE, bundle_url=url)
        pull_mod = sys.modules[pack.__name__ + ".core.pull"]
        server.gate.set()
        assert pull_mod.join_pulls(60)
        assert (comfy.models / "provenance" / "pulled" / "manifest.json").is_file()
        assert "pulled" in sys.modules[pack.__name__ + ".comfyui_nodes.nodes_provenance"].bundle_folders()
        hits = len(server.log)
        out, extra = run(pack, tensor("astronaut"), bundle=NO_BUNDLE, bundle_url=url, fail_mode=mode,
                         on_match="block")
        assert isinstance(out["result"][0], ExecutionBlocker) and extra.get("provenance") is None
        image = out["ui"]["provenance"][0]["images"][0]
        assert image["verdict"] == "block" and image["matches"][0]["url"] == "astronaut.png"
        assert cls.IS_CHANGED(bundle=NO_BUNDLE, bundle_url=url) == cls.IS_CHANGED(bundle=NO_BUNDLE, bundle_url=url)
        pull_mod._JOBS.clear()  # a restart: the record beside the bundle finds it, no network
        out, _ = run(pack, tensor("camera"), bundle=NO_BUNDLE, bundle_url=url, fail_mode=mode)
        assert out["ui"]["provenance"][0]["images"][0]["verdict"] in ("pass", "warn")
        assert len(server.log) == hits
        out, _ = run(pack, tensor("camera"), bundle_url=url, bundle_path=str(built_bundle), fail_mode="open")
        assert "clear one of them" in out["result"][3]
    finally:
        server.close()


def test_the_bundle_fields_say_what_they_take(pack):
    spec = pack.NODE_CLASS_MAPPINGS["ProvenanceCheck"].INPUT_TYPES()["optional"]
    assert "index server URL (http://host:port/NAME)" in spec["bundle_path"][1]["tooltip"]
    assert spec["bundle_url"][0] == "STRING" and spec["bundle_url"][1]["default"] == ""
    assert list(spec)[-2:] == ["bundle_url", "views"]  # saved workflows give widget values by position: new go last
    assert "downloaded once" in spec["bundle_url"][1]["tooltip"]


def test_the_views_input_reaches_the_check_and_finds_a_copy_in_a_quarter(pack):
    """views: last optional input, "whole" by default (a workflow saved without it runs as before); "multi"
    queries the quarters and the centre too and verifies a candidate against the part that found it."""
    from provenance_guard.core.policy import VIEWS

    spec = pack.NODE_CLASS_MAPPINGS["ProvenanceCheck"].INPUT_TYPES()["optional"]["views"]
    assert spec[0] == ["whole", "multi"] and set(spec[0]) == set(VIEWS) and spec[1]["default"] == "whole"
    composite = tensor("coins", size=256)
    composite[0, :128, :128] = tensor("astronaut", size=128)[0]  # a reference in the top-left quarter
    tops = {}
    for views in (None, "whole", "multi"):
        _, extra = run(pack, composite, verify="confirm+escalate", **({} if views is None else {"views": views}))
        tops[views] = extra["provenance"]["matches"][0]  # the record Save Image writes
    same = ("url", "score", "verdict")
    assert [tops[None][k] for k in same] == [tops["whole"][k] for k in same] and tops["whole"].get("view") is None
    assert tops["multi"]["view"] == "top-left" and tops["multi"]["url"] == "astronaut.png"
    assert tops["multi"]["verification"]["status"] == "copy" and tops["multi"]["score"] > tops["whole"]["score"]
    cls = pack.NODE_CLASS_MAPPINGS["ProvenanceCheck"]
    assert cls.IS_CHANGED(bundle="studio-refs", views="multi") != cls.IS_CHANGED(bundle="studio-refs")
    with pytest.raises(Exception, match="give whole or multi"):  # never waved through as whole
        run(pack, composite, views="many")


# Content Credentials -------------------------------------------------------------------------------------------

class SaveImage:
    """nodes.SaveImage of ComfyUI v0.3.64, as far as signing sees it: one PNG per image with a "prompt" chunk and
    one chunk per EXTRA_PNGINFO key (workflow, our provenance record), reported as {filename, subfolder, type}."""

    def __init__(self):
        import folder_paths

        self.output_dir, self.type, self.prefix_append = folder_paths.get_output_directory(), "output", ""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        from PIL import Image, PngImagePlugin

        filename_prefix += self.prefix_append
        results = []
        for n, image in enumerate(images):
            img = Image.fromarray(np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8))
            metadata = PngImagePlugin.PngInfo()
            if prompt is not None:
                metadata.add_text("prompt", json.dumps(prompt))
            for key in extra_pnginfo or {}:
                metadata.add_text(key, json.dumps(extra_pnginfo[key]))
            file = f"{filename_prefix}_{n:05}_.png"
            img.save(Path(self.output_dir) / file, pnginfo=metadata, compress_level=4)
            results.append({"filename": file, "subfolder": "", "type": self.type})
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    def __init__(self):
        import folder_paths

        super().__init__()
        self.output_dir, self.type, self.prefix_append = folder_paths.get_temp_directory(), "temp", "_temp_x"


class SaveAnimatedWEBP:
    """comfy_extras' SaveAnimatedWEBP: every frame into one file (metadata in EXIF)."""

    def __init__(self):
        import folder_paths

        self.output_dir, self.type = folder_paths.get_output_directory(), "output"

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True

    def save_images(self, images, fps, filename_prefix, lossless, quality, method, num_frames=0, prompt=None,
                    extra_pnginfo=None):
        from PIL import Image

        frames = [Image.fromarray(np.clip(255.0 * i.cpu().numpy(), 0, 255).astype(np.uint8)) for i in images]
        exif = frames[0].getexif()
        exif[0x0110] = f"prompt:{json.dumps(prompt)}"
        file = f"{filename_prefix}_00001_.webp"
        frames[0].save(Path(self.output_dir) / file, save_all=True, duration=int(1000 / fps),
                       append_images=frames[1:], exif=exif, lossless=lossless, quality=quality)
        return {"ui": {"images": [{"filename": file, "subfolder": "", "type": self.type}], "animated": (True,)}}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    from provenance_guard.core.credentials import init_credentials

    folder = tmp_path_factory.mktemp("keys")
    init_credentials(folder, organization="Comfy Studio")
    return folder


@pytest.fixture
def saving(comfy, monkeypatch):
    """The stand-ins grow what the save nodes need: output/temp/input folders, the save nodes themselves and
    the executing context (which node runs now)."""
    fp = sys.modules["folder_paths"]
    for name in ("output", "temp", "input", "user"):
        (comfy.tmp / name).mkdir(exist_ok=True)
    fp.get_output_directory = lambda: str(comfy.tmp / "output")
    fp.get_temp_directory = lambda: str(comfy.tmp / "temp")
    fp.get_input_directory = lambda: str(comfy.tmp / "input")
    fp.get_annotated_filepath = lambda name, default_dir=None: str(comfy.tmp / "input" / name)
    classes: dict = {}
    nodes_mod = sys.modules["nodes"]

    def fresh_classes():
        """New classes for each load (the wrapper goes onto the class ComfyUI has, once per process)."""
        save = type("SaveImage", (SaveImage,), {"save_images": SaveImage.__dict__["save_images"]})

        def init(self):
            save.__init__(self)
            self.output_dir, self.type, self.prefix_append = fp.get_temp_directory(), "temp", "_temp_x"

        classes.update({"SaveImage": save, "PreviewImage": type("PreviewImage", (save,), {"__init__": init}),
                        "SaveAnimatedWEBP": type("SaveAnimatedWEBP", (SaveAnimatedWEBP,),
                                                 {"save_images": SaveAnimatedWEBP.__dict__["save_images"]})})
        nodes_mod.NODE_CLASS_MAPPINGS.update(classes)
        nodes_mod.SaveImage = classes["SaveImage"]

    running = {"node": None}
    utils = types.ModuleType("comfy_execution.utils")
    utils.get_executing_context = lambda: (types.SimpleNamespace(prompt_id="p1", node_id=running["node"])
                                           if running["node"] else None)
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", utils)
    names = []

    def load(config: dict | None):
        """The pack as ComfyUI loads it at start (a fresh start: its handlers and save classes only)."""
        fresh_classes()
        PromptServer.instance.on_prompt_handlers.clear()
        if config is not None:
            (comfy.tmp / "user" / "provenance_guard.json").write_text(json.dumps(config))
        name = f"{comfy.tmp}/custom_nodes/provenance-guard-signing{len(names)}".replace(".", "_x_")
        names.append(name)
        module = load_pack(name)
        assert module.NODE_CLASS_MAPPINGS  # ComfyUI reading the mappings runs the registration
        module.signing = sys.modules[name + ".comfyui_nodes.credentials"]
        return module

    yield types.SimpleNamespace(load=load, classes=classes, running=running, out=comfy.tmp / "output",
                                temp=comfy.tmp / "temp", input=comfy.tmp / "input", tmp=comfy.tmp)
    for name in names:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def checked(module, names, on_match="warn", prompt=None, unique_id="10"):
    """The Provenance Check of the loaded pack on these sample images: (its output images, extra_pnginfo)."""
    node = module.NODE_CLASS_MAPPINGS["ProvenanceCheck"]()
    extra = {"workflow": {"nodes": [{"id": 10, "type": "ProvenanceCheck"}]}}
    out = node.check(tensor(*names), bundle="studio-refs", on_match=on_match, fail_mode="open", top_k=3,
                     extra_pnginfo=extra, prompt=prompt or {}, unique_id=unique_id)
    return out["result"][0], extra


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def refused(module, graph) -> str | None:
    data = {"prompt": graph}
    for handler in PromptServer.instance.on_prompt_handlers:
        data = handler(data)
    (node_id, node), *_ = data["prompt"].items()
    return refusal_reason(data["prompt"]) if node["class_type"] == "ProvenanceGuardRefusal" else None


def test_credentials_config_is_validated_strictly_and_alone_enforces_nothing(saving, comfy, keys):
    from provenance_guard.comfyui_nodes import credentials as cc
    from provenance_guard.comfyui_nodes.enforce import load_config as enforcement

    user = comfy.tmp / "user"
    assert cc.load_config(str(user)) == cc.DEFAULTS  # no file: off
    (user / "provenance_guard.json").write_text(json.dumps({"credentials": {"mode": "on", "folder": str(keys)}}))
    cfg = cc.load_config(str(user))
    assert (cfg["mode"], cfg["folder"], cfg["prompts"]) == ("on", str(keys), True)
    assert enforcement(str(user), environ={}) is None  # credentials alone: no enforcement
    for bad, why in [({"credentials": {"mode": "yes"}}, '"mode" must be'), ({"credentials": "on"}, "must be an object"),
                     ({"credentials": {"mode": "on", "key": "x"}}, "unknown key"),
                     ({"credentials": {"mode": "on", "prompts": "no"}}, '"prompts" must be true or false'),
                     ({"credentials": {"mode": "on", "folder": 5}}, '"folder" must be')]:
        (user / "provenance_guard.json").write_text(json.dumps(bad))
        with pytest.raises(cc.CredentialsConfigError, match=why):
            cc.load_config(str(user))
    # loaded by ComfyUI with a bad "credentials" object: every prompt is refused, saying why
    module = saving.load({"credentials": {"mode": "requird"}})
    reason = refused(module, example_graph())
    assert '"mode" must be' in reason and "Every prompt is refused" in reason


def test_save_image_files_are_signed_after_comfyui_writes_them(saving, keys):
    """The prompt/workflow chunks and the record are written first, the signature last: the manifest is
    valid, and each file carries the check of its own pixels (the astronaut, kept under warn, says block)."""
    cr = pytest.importorskip("provenance_guard.core.credentials")
    pytest.importorskip("c2pa")
    module = saving.load({"credentials": {"mode": "on", "folder": str(keys)}})
    graph = example_graph()
    images, extra = checked(module, ["astronaut", "camera"], prompt=graph)
    saving.running["node"] = "9"
    out = saving.classes["SaveImage"]().save_images(images, "t2i", prompt=graph, extra_pnginfo=extra)
    paths = [saving.out / e["filename"] for e in out["ui"]["images"]]
    root = (keys / "root.pem").read_bytes()
    for path, verdict in zip(paths, ["block", "pass"], strict=True):
        chunks = png_text_chunks(path)
        assert json.loads(chunks["prompt"]) == graph and "workflow" in chunks and "provenance" in chunks
        status = cr.verify_file(path, root)
        assert status.state == "trusted", status.problems
        assert status.check["verdict"] == read_record(path).verdict == verdict
        assert status.generation["prompt"] == "a portrait photo of an astronaut, studio lighting"
    # Preview Image (the temp folder) is not signed; pixels no check saw are saved unsigned under "on"
    out = saving.classes["PreviewImage"]().save_images(images)
    assert cr.verify_file(saving.temp / out["ui"]["images"][0]["filename"]).state == "absent"
    out = saving.classes["SaveImage"]().save_images(tensor("coins"), "unchecked", prompt=graph)
    assert cr.verify_file(saving.out / out["ui"]["images"][0]["filename"]).state == "absent"
    # an animation: the check of its most serious frame, once every frame was checked
    out = saving.classes["SaveAnimatedWEBP"]().save_images(images, 6.0, "anim", True, 80, "default", prompt=graph)
    status = cr.verify_file(saving.out / out["ui"]["images"][0]["filename"])
    assert status.state == "valid" and status.check["verdict"] == "block"


def test_replaced_images_carry_their_block_and_prompts_can_be_left_out(saving, keys):
    cr = pytest.importorskip("provenance_guard.core.credentials")
    pytest.importorskip("c2pa")
    module = saving.load({"credentials": {"mode": "required", "folder": str(keys), "prompts": False}})
    images, extra = checked(module, ["astronaut", "camera"], on_match="replace", prompt=example_graph())
    out = saving.classes["SaveImage"]().save_images(images, "replaced", extra_pnginfo=extra)
    statuses = [cr.verify_file(saving.out / e["filename"]) for e in out["ui"]["images"]]
    assert [s.check["verdict"] for s in statuses] == ["block", "pass"]
    assert all("prompt" not in s.generation for s in statuses)


def test_required_fails_closed_nothing_is_saved_unsigned(saving, keys, monkeypatch):
    pytest.importorskip("c2pa")
    cr = pytest.importorskip("provenance_guard.core.credentials")
    monkeypatch.delenv(cr.ENV_CREDENTIALS, raising=False)
    module = saving.load({"credentials": {"mode": "required", "folder": str(saving.tmp / "no-keys")}})
    reason = refused(module, example_graph())
    assert "Content Credentials are required but cannot be written" in reason and "credentials init" in reason
    assert refused(module, {"1": {"class_type": "PreviewImage", "inputs": {}}}) is None  # saves nothing
    images, extra = checked(module, ["camera"])
    with pytest.raises(RuntimeError, match="required but cannot be written.*Nothing was saved"):
        saving.classes["SaveImage"]().save_images(images, "none", extra_pnginfo=extra)
    assert files(saving.out) == []
    assert "cannot be written into" in refused(module, {"1": {"class_type": "SaveWEBM", "inputs": {}}})
    assert "required but cannot be written" in refused(module, {"1": {"class_type": "SaveVideo", "inputs": {}}})

    module = saving.load({"credentials": {"mode": "required", "folder": str(keys)}})
    assert refused(module, example_graph()) is None
    with pytest.raises(RuntimeError, match="not checked by a Provenance Check"):  # pixels no check saw
        saving.classes["SaveImage"]().save_images(tensor("coins"), "unchecked")
    assert files(saving.out) == []

    own = sys.modules[module.__name__ + ".core.credentials"]  # the loaded pack's own core

    def broken(*a, **k):
        raise own.CredentialsError("simulated signing failure")

    images, extra = checked(module, ["camera", "coffee"])
    monkeypatch.setattr(own, "sign_file", broken)
    with pytest.raises(RuntimeError, match="could not be written: simulated signing failure"):
        saving.classes["SaveImage"]().save_images(images, "failing", extra_pnginfo=extra)
    assert files(saving.out) == []  # the unsigned files were removed


def test_the_explicit_save_node_signs_or_fails_the_prompt(saving, keys, monkeypatch):
    cr = pytest.importorskip("provenance_guard.core.credentials")
    pytest.importorskip("c2pa")
    monkeypatch.delenv(cr.ENV_CREDENTIALS, raising=False)
    module = saving.load({"credentials": {"mode": "off", "folder": str(keys)}})
    cls = module.NODE_CLASS_MAPPINGS["ProvenanceSaveImage"]
    assert module.NODE_DISPLAY_NAME_MAPPINGS["ProvenanceSaveImage"] == "Save Image (Content Credentials)"
    assert cls.CATEGORY == "provenance" and cls.OUTPUT_NODE and cls.VALIDATE_INPUTS("x") is True
    images, extra = checked(module, ["camera"], prompt=example_graph())
    out = cls().save_images(images, "explicit", include_prompts=False, prompt=example_graph(), extra_pnginfo=extra)
    path = saving.out / out["ui"]["images"][0]["filename"]
    status = cr.verify_file(path)
    assert status.state == "valid" and status.check["verdict"] == "pass" and "prompt" not in status.generation
    assert "workflow" in png_text_chunks(path)
    # mode off: plain Save Image is not signed (and the node did not sign twice: one valid manifest)
    out = saving.classes["SaveImage"]().save_images(images, "plain")
    assert cr.verify_file(saving.out / out["ui"]["images"][0]["filename"]).state == "absent"
    with pytest.raises(RuntimeError, match="not checked by a Provenance Check"):
        cls().save_images(tensor("coins"), "explicit-unchecked")
    module = saving.load({"credentials": {"mode": "off"}})  # no key anywhere
    cls = module.NODE_CLASS_MAPPINGS["ProvenanceSaveImage"]
    assert "no signing key" in cls.VALIDATE_INPUTS("x")
    before = files(saving.out)
    with pytest.raises(RuntimeError, match="no signing key"):
        cls().save_images(images, "explicit-nokey")
    assert files(saving.out) == before


def test_without_c2pa_credentials_are_said_off_once(saving, keys, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "c2pa", None)
    with caplog.at_level("WARNING", logger="provenance_guard"):
        module = saving.load({"credentials": {"mode": "on", "folder": str(keys)}})
        images, extra = checked(module, ["camera"])
        for n in range(2):
            saving.classes["SaveImage"]().save_images(images, f"plain{n}", extra_pnginfo=extra)
    said = [r.message for r in caplog.records if "Content Credentials are off" in r.message]
    assert len(said) == 1 and "c2pa-python is not installed" in said[0]
    assert len(files(saving.out)) == 2  # "on": saved, unsigned
    assert "c2pa-python is not installed" in module.NODE_CLASS_MAPPINGS["ProvenanceSaveImage"].VALIDATE_INPUTS("x")


def test_a_loaded_image_is_the_parent_ingredient(saving, keys):
    c2pa = pytest.importorskip("c2pa")
    cr = pytest.importorskip("provenance_guard.core.credentials")
    module = saving.load({"credentials": {"mode": "on", "folder": str(keys)}})
    sample_image("camera").convert("RGB").resize((96, 96)).save(saving.input / "in.png")
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
             "2": {"class_type": "ProvenanceCheck", "inputs": {"images": ["1", 0]}},
             "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "loaded"}}}
    images, extra = checked(module, ["camera"], prompt=graph, unique_id="2")
    saving.running["node"] = "3"
    out = saving.classes["SaveImage"]().save_images(images, "loaded", prompt=graph, extra_pnginfo=extra)
    path = saving.out / out["ui"]["images"][0]["filename"]
    assert cr.verify_file(path).state == "valid"
    with open(path, "rb") as f, c2pa.Reader("image/png", f) as reader:
        manifest = reader.get_active_manifest()
    (ingredient,) = manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf" and ingredient["title"] == "in.png"
