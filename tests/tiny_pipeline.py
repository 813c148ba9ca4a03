"""A tiny Stable Diffusion pipeline built from configs, offline: small UNet2DConditionModel, AutoencoderKL and
CLIPTextModel with seeded random weights, a DDIM scheduler, and a CLIP tokenizer made from open_clip's BPE
vocabulary (the same BPE CLIP ships; transformers' CLIPTokenizer reads it as vocab.json + merges.txt). For
tests and bench/q2_memorization.py; never downloads anything."""
from __future__ import annotations

import gzip
import json
from pathlib import Path


def clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of CLIP's BPE, written from open_clip's bundled vocabulary."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not vocab_path.is_file():
        bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        with gzip.open(bpe) as f:
            merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        vocab_path.write_text(json.dumps({v: i for i, v in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
        merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def tokenizer(folder: Path, max_length: int = 16):
    from transformers import CLIPTokenizer

    vocab, merges = clip_tokenizer_files(folder)
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=max_length, pad_token="<|endoftext|>")


def text_encoder(seed: int = 0, max_length: int = 16, width: int = 32):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(config).eval()


def unet(seed: int = 0, sample_size: int = 8, in_channels: int = 4, cross_attention_dim: int = 32):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                                layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)


def vae(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                         norm_num_groups=8, sample_size=16)


def pipeline(folder: Path, seed: int = 0, prediction_type: str = "epsilon"):
    """The tiny StableDiffusionPipeline (16 x 16 pixels, latents 8 x 8)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae(seed), text_encoder=text_encoder(seed), tokenizer=tokenizer(folder),
                                   unet=unet(seed), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
