"""Studio enforcement: every queued graph gets a Provenance Check (on_match=block, fail mode closed) in
front of every Save Image, so no workflow can skip the check.

Opt-in, by either
- the environment variable PROVENANCE_GUARD_ENFORCE=<bundle> (a folder name under models/provenance, a
  path, or a server URL), or
- a file provenance_guard.json in ComfyUI's user folder: {"enforce": {"bundle": "...", "fail_mode":
  "closed", "save_nodes": ["SaveImage"], "top_k": 5}}.
The handler never lets an unparsable graph through: if rewriting fails, each save node is pointed at a
node that does not exist, so ComfyUI refuses the prompt with a validation error instead of saving.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

ENV = "PROVENANCE_GUARD_ENFORCE"
CONFIG_FILE = "provenance_guard.json"
PREFIX = "provenance-guard-enforce-"
DEFAULTS = {"fail_mode": "closed", "save_nodes": ["SaveImage"], "top_k": 5}

log = logging.getLogger("provenance_guard")


def load_config(user_dir: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The enforcement settings, or None when enforcement is off."""
    cfg: dict[str, Any] = {}
    if user_dir and os.path.isfile(os.path.join(user_dir, CONFIG_FILE)):
        with open(os.path.join(user_dir, CONFIG_FILE), encoding="utf-8") as f:
            cfg = dict((json.load(f) or {}).get("enforce") or {})
    if os.environ.get(ENV):
        cfg["bundle"] = os.environ[ENV]
    if not cfg.get("bundle"):
        return None
    return {**DEFAULTS, **cfg}


def _is_path(bundle: str) -> bool:
    return "://" in bundle or os.path.isabs(bundle) or bundle.startswith(("./", "../", "~"))


def enforce_prompt(json_data: dict, config: dict[str, Any]) -> dict:
    """Insert a blocking Provenance Check in front of every save node of json_data["prompt"]."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data
    save_nodes = set(config.get("save_nodes") or DEFAULTS["save_nodes"])
    try:
        for node_id, node in list(prompt.items()):
            if not isinstance(node, dict) or node.get("class_type") not in save_nodes:
                continue
            inputs = node.setdefault("inputs", {})
            source = inputs.get("images")
            if isinstance(source, list) and source and str(source[0]).startswith(PREFIX):
                continue  # already enforced (the handler ran twice)
            check_id = f"{PREFIX}{node_id}"
            bundle = str(config["bundle"])
            prompt[check_id] = {
                "class_type": "ProvenanceCheck",
                "inputs": {"images": source, "bundle": "" if _is_path(bundle) else bundle,
                           "bundle_path": bundle if _is_path(bundle) else "", "on_match": "block",
                           "fail_mode": config.get("fail_mode", "closed"), "use_bundle_thresholds": True,
                           "warn": 0.90, "block": 0.95, "top_k": int(config.get("top_k", 5))},
                "_meta": {"title": "Provenance Check (studio enforced)"},
            }
            inputs["images"] = [check_id, 0]
    except Exception:  # noqa: BLE001 - ComfyUI would log and queue the graph unchecked: refuse it instead
        log.exception("provenance-guard: could not insert the enforced check; refusing the prompt")
        for node in prompt.values():
            if isinstance(node, dict) and node.get("class_type") in save_nodes:
                node.setdefault("inputs", {})["images"] = [f"{PREFIX}failed", 0]
    return json_data


def record_slot(json_data: dict) -> dict:
    """Give a queued graph that holds a Provenance Check an EXTRA_PNGINFO dict, so the node has somewhere to
    put the record for Save Image even when an API client sent no extra_data (the UI always sends one)."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if isinstance(prompt, dict) and any(isinstance(n, dict) and n.get("class_type") == "ProvenanceCheck"
                                        for n in prompt.values()):
        extra = json_data.get("extra_data")
        if not isinstance(extra, dict):
            extra = json_data["extra_data"] = {}
        if not isinstance(extra.get("extra_pnginfo"), dict):
            extra["extra_pnginfo"] = {}
    return json_data


def bundle_choice_ok(config: dict[str, Any], folders: list[str]) -> bool:
    bundle = str(config["bundle"])
    return _is_path(bundle) or bundle in folders


def register(server, config: dict[str, Any]) -> None:
    """Registered before ``record_slot`` (register_with_comfyui), so the slot also covers the checks that
    enforcement inserts."""
    server.add_on_prompt_handler(lambda json_data: enforce_prompt(json_data, config))
    log.info("provenance-guard: studio enforcement on: every Save Image is preceded by a blocking check "
             "against %s", config["bundle"])
