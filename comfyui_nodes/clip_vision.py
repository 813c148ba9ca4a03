"""Use ComfyUI's already-loaded CLIP vision model as the embedder, when it is the bundle's model.

ComfyUI's ClipVisionModel does not say which checkpoint it holds; its architecture does (layers, width,
patch size, input size, projection) together with the activation (OpenAI's weights use quick_gelu,
LAION's open_clip weights gelu). That identifies the open_clip spec; a bundle made with another model is
refused, since its scores would be meaningless.
"""
from __future__ import annotations


from ..core.errors import ConfigError
from ..core.images import Pixels
from ..core.models import ModelSpec

# (layers, width, patch, image size, projection dim, activation) -> open_clip spec
KNOWN = {
    (12, 768, 32, 224, 512, "quick_gelu"): "ViT-B-32/openai",
    (12, 768, 16, 224, 512, "quick_gelu"): "ViT-B-16/openai",
    (24, 1024, 14, 224, 768, "quick_gelu"): "ViT-L-14/openai",
    (24, 1024, 14, 336, 768, "quick_gelu"): "ViT-L-14-336/openai",
    (32, 1280, 14, 224, 1024, "gelu"): "ViT-H-14/laion2b_s32b_b79k",
    (48, 1664, 14, 224, 1280, "gelu"): "ViT-bigG-14/laion2b_s39b_b160k",
}


def describe(clip_vision) -> tuple:
    model = clip_vision.model
    vision = model.vision_model
    conv = vision.embeddings.patch_embedding
    layers = vision.encoder.layers
    proj = getattr(model.visual_projection, "out_features", None)
    activation = "unknown"
    try:
        import comfy.clip_model as cm

        for name, fn in cm.ACTIVATIONS.items():
            if layers[0].mlp.activation is fn:
                activation = name
    except (ImportError, AttributeError, IndexError):
        pass
    return (len(layers), conv.out_channels, conv.kernel_size[0], int(clip_vision.image_size), proj, activation)


def identify(clip_vision) -> str | None:
    """The open_clip spec of a ComfyUI CLIP vision model, or None when it is not one we know."""
    try:
        return KNOWN.get(describe(clip_vision))
    except AttributeError:
        return None


class ComfyClipVisionEmbedder:
    """Embedder interface (spec, dim, embed_pixels) over ComfyUI's CLIP_VISION object."""

    def __init__(self, clip_vision, bundle_model: str):
        spec = identify(clip_vision)
        want = ModelSpec.parse(bundle_model)
        if spec is None:
            raise ConfigError(
                f"the CLIP vision model given to Provenance Check is not one whose open_clip weights are known "
                f"(architecture {describe(clip_vision)}); disconnect the clip_vision input to embed with "
                f"{bundle_model}")
        if want.kind != "tag" or spec != f"{want.arch}/{want.source}":
            raise ConfigError(
                f"the connected CLIP vision model is {spec} but the bundle was made with {bundle_model}: its scores "
                f"would be meaningless; disconnect clip_vision (the node then loads {bundle_model}) or load that "
                f"model in Load CLIP Vision")
        self.spec = ModelSpec.parse(spec)
        self.clip_vision = clip_vision
        self.cache_owner = clip_vision  # the fingerprint's probes are embedded once per loaded model
        self.dim = int(clip_vision.model.visual_projection.out_features)

    def embed_pixels(self, pixels: list[Pixels], batch_size: int = 32):
        import numpy as np
        import torch

        out = []
        for start in range(0, len(pixels), batch_size):
            chunk = pixels[start:start + batch_size]
            for p in chunk:
                # ComfyUI's encoder takes [B,H,W,C] floats; images of one batch may differ in size.
                image = (p.tensor.float() / 255.0).unsqueeze(0)
                emb = self.clip_vision.encode_image(image, crop=True)["image_embeds"].float()
                out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        return np.concatenate(out, 0).astype(np.float32)
