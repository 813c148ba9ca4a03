"""Q2: does the memorization signal separate memorized prompts from ordinary ones? AUC and TPR at 1 % FPR with
bootstrap confidence intervals, on a toy model trained here to memorize, or on a real diffusers pipeline.

A toy pixel-space model is not Stable Diffusion: its figures say that the signal works on a model that
memorizes, not how well it works on SD, and they do not transfer to any real family (nor does its threshold).

The toy (default). No Stable Diffusion weights can be fetched on these machines, so this trains a model that
memorizes, on CPU: a small conditional diffusion model in pixel space (diffusers UNet2DConditionModel,
16 x 16 RGB, Stable Diffusion 1's noise schedule) on a small frozen CLIP text encoder (tests/tiny_pipeline.py).
Data: 32 crops of scikit-image's photos, each duplicated 30 times under its own caption, among 150 crops
with unique captions (trained once each), 10 % caption dropout so classifier-free guidance works; every crop
lies farther than 0.30 (tiled L2) from every other, so a copy of one is a copy of no other. Captions are
5 words drawn from one 47-word vocabulary, the unseen prompts too.

Ground truth is established by generation, never assumed (Carlini et al. 2023): a training prompt counts as
memorized when one of its 4 generations (25 DDIM steps, CFG 2) comes within tiled L2 0.15 of its training
image (the largest RMS difference over a 4 x 4 grid of tiles, on [0, 1]). CFG 2, not SD's 7.5: in pixel space,
without a VAE, stronger guidance oversaturates this toy's samples and hides what it memorized (the output
reports how many duplicated prompts reproduce at CFG 1, 2, 3 and 7.5; the signal at step 1 does not depend
on the scale, later steps do). Positives: the duplicated prompts so memorized. Negatives: 240 unseen
prompts (no training image: never memorized by definition; how many of their generations land on some
training image anyway is reported) and the non-duplicated training prompts whose generations do not
reproduce their image. Duplicated prompts that were not reproduced, and non-duplicated ones that were, are in
neither set: they are counted and shown apart.

The signal is core.memorization's, read through the diffusers integration's own CFG hook
(integrations.diffusers._CfgReader on the UNet): RMS(eps(x_t, prompt) - eps(x_t, empty)) at step 1, and its
mean over the first 3 and the first 5 steps (MemorizationMonitor(3), (5); 5 is the monitor's default), of one
generation per prompt (seed 0), as a host sees one image. AUC: the Mann-Whitney statistic (ties count one
half). TPR at 1 % FPR: with n negatives, k = floor(0.01 n) of them may lie above the threshold, so the
threshold is the (k+1)-th highest negative score and a prompt is flagged when its score is strictly above it
(n = 200..299: above the 3rd highest). 95 % intervals: percentile bootstrap, positives and negatives resampled
separately (2,000 resamples), the threshold recomputed in each. The monitor's cost per step is measured too.

The trained model (unet.safetensors, ~7 MB, with unet.json: its training configuration and time), the CLIP
tokenizer files it is built with and the measured results (threshold.json) are kept in bench/out/q2/
(git-ignored), so a rerun only evaluates (--retrain trains again; a changed configuration retrains).
--smoke runs a seconds-long version of every stage (tests).

A real family (--model): a diffusers folder (DiffusionPipeline.from_pretrained: SD 1/2, SDXL) or a single-file
SD checkpoint (StableDiffusionPipeline.from_single_file; --config DIR for its configs offline), a file of
known memorized prompts (one a line, e.g. Webster's 500 memorized SD 1.5 prompts; "prompt<TAB>image path"
lines are verified by generation as above, and count only if reproduced) and a file of ordinary prompts.
It prints the same table and the threshold that keeps the controls at <= 1 % FPR, for
core.memorization.THRESHOLDS. Runs on CPU (slowly: without image paths only the first 5 steps are run) or on
the GPU (--device).

    .venv/bin/python bench/q2_memorization.py [--train-steps 3000] [--retrain] [--smoke]
    .venv/bin/python bench/q2_memorization.py --model PATH --memorized FILE --controls FILE [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tiny_pipeline: the text encoder and tokenizer of the tests

SIZE = 16
PHOTOS = ["astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "hubble_deep_field",
          "immunohistochemistry", "moon", "page", "retina", "rocket", "text", "horse", "logo", "clock"]
WORDS = ("red blue green small large old new quiet bright dark river mountain city forest window garden bridge "  # noqa: SIM905
         "tower ship train house road field cloud stone glass paper metal wooden silver golden morning evening "
         "winter summer north south ancient modern painted drawn lonely crowded").split()  # noqa: SIM905 - reads as words
STEPS = (1, 3, 5)  # the signal at step 1 and its means over the first 3 and 5 steps (5: core.memorization's
# DEFAULT_STEPS, the score hosts judge and THRESHOLDS holds)
COPY_L2 = 0.15  # Carlini et al.'s tiled L2 for "extracted"
FPR = 0.01
# Published figures (Stable Diffusion 1.x, their own prompt sets), for comparison only: not re-measured here.
FIELD = (("Wen et al., ICLR 2024 (SD 1.5)", "step 1", "0.962", "0.79"),
         ("Jeon et al., ICML 2025", "", "0.998", "-"),
         ('"Broken Memories", 2026', "within 3 steps", "0.9995", "-"))
NOT_SD = ("A toy pixel-space model is not Stable Diffusion: these figures show that the signal works on a model "
          "that memorizes, not how well it works on SD; they and the toy's threshold do not transfer.")


@dataclass
class Toy:
    """The toy's data and sizes: n_dup images x copies under their own captions, n_unique once each."""

    n_dup: int = 32
    copies: int = 30
    n_unique: int = 150
    n_unseen: int = 240
    train_steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    sample_steps: int = 25
    guidance: float = 2.0  # higher, this pixel-space toy oversaturates and reproduces less (the sweep shows it)
    sweep: tuple[float, ...] = (1.0, 3.0, 7.5)  # other guidance scales tried on the duplicated prompts (report)

    def training(self) -> dict:
        """What the trained model depends on (a change retrains)."""
        return {k: getattr(self, k) for k in ("n_dup", "copies", "n_unique", "train_steps", "batch", "lr")}


SMOKE = Toy(n_dup=3, copies=4, n_unique=6, n_unseen=6, train_steps=4, batch=8, seeds=(0, 1), sample_steps=5,
            sweep=(1.0,))


# metrics --------------------------------------------------------------------------------------------------------

def tiled_l2(gen, ref):
    """Carlini's tiled L2 between images [..., H, W, C] in [0, 1] (broadcast): the largest RMS difference over a
    4 x 4 grid of tiles (H and W divisible by 4)."""
    import numpy as np

    d = (np.asarray(gen, np.float32) - np.asarray(ref, np.float32)) ** 2
    h, w, c = d.shape[-3:]
    d = d.reshape(*d.shape[:-3], 4, h // 4, 4, w // 4, c)
    return np.sqrt(d.mean(axis=(-4, -2, -1))).max(axis=(-2, -1))


def auc(pos, neg) -> float:
    """P(score of a positive > score of a negative), ties one half (Mann-Whitney)."""
    import numpy as np

    pos, neg = np.asarray(pos, np.float64)[:, None], np.asarray(neg, np.float64)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def tpr_at_fpr(pos, neg, fpr: float = FPR) -> tuple[float, float]:
    """(TPR, threshold) at FPR <= fpr: the threshold is the (k+1)-th highest negative, k = floor(fpr * n), and
    a score counts as flagged when strictly above it, so at most k negatives are."""
    import numpy as np

    neg = np.sort(np.asarray(neg, np.float64))[::-1]
    k = int(np.floor(fpr * len(neg) + 1e-9))
    threshold = float(neg[k]) if k < len(neg) else float("-inf")
    return float((np.asarray(pos, np.float64) > threshold).mean()), threshold


def bootstrap(pos, neg, resamples: int = 2000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of AUC and TPR at 1 % FPR: positives and negatives resampled separately."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    aucs, tprs = np.empty(resamples), np.empty(resamples)
    for i in range(resamples):
        p, n = pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]
        aucs[i], tprs[i] = auc(p, n), tpr_at_fpr(p, n)[0]
    ci = lambda a: (float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5)))  # noqa: E731
    return {"auc": ci(aucs), "tpr": ci(tprs)}


def round_up(x: float, digits: int = 4) -> float:
    """The smallest number of `digits` significant digits strictly above x: as a threshold (flag when the score is
    >= it) it flags exactly the scores above x, up to that rounding."""
    import math

    if not math.isfinite(x) or x <= 0:
        return x
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    return (math.floor(x * scale) + 1) / scale


# the signal, through the diffusers integration's hook -------------------------------------------------------------

class Readers:
    """One integrations.diffusers._CfgReader per entry of STEPS on a denoiser, active within a ``with``."""

    def __init__(self, pipe, denoiser):
        from provenance_guard.integrations.diffusers import _CfgReader

        self.readers = {n: _CfgReader(pipe, n) for n in STEPS}
        self.handles = [denoiser.register_forward_hook(r, with_kwargs=True) for r in self.readers.values()]

    def __enter__(self):
        for r in self.readers.values():
            r.monitor.reset()
            r.active = True
        return self

    def __exit__(self, *exc):
        for r in self.readers.values():
            r.active = False

    def scores(self, count: int) -> dict[int, list[float]]:
        """Per step count: one score per image (nan when unavailable)."""
        return {n: [float("nan") if s.score is None else s.score for s in r.monitor.scores(count)]
                for n, r in self.readers.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# the table ----------------------------------------------------------------------------------------------------------

@dataclass
class Evaluation:
    """Scores of the positives and negatives per step count (one generation each), and what was left out."""

    pos: dict[int, list[float]]
    neg: dict[int, list[float]]
    counts: dict[str, int] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)

    def compute(self, resamples: int = 2000) -> None:
        import numpy as np

        for n in STEPS:
            pos, neg = np.asarray(self.pos[n]), np.asarray(self.neg[n])
            if not len(pos) or not len(neg) or not (np.isfinite(pos).all() and np.isfinite(neg).all()):
                self.results[str(n)] = {"auc": float("nan"), "tpr": float("nan"), "threshold": float("nan"),
                                        "auc_ci": (float("nan"),) * 2, "tpr_ci": (float("nan"),) * 2}
                continue
            tpr, threshold = tpr_at_fpr(pos, neg)
            ci = bootstrap(pos, neg, resamples)
            suggested = round_up(threshold)
            self.results[str(n)] = {"auc": auc(pos, neg), "tpr": tpr, "threshold": threshold,
                                    "auc_ci": ci["auc"], "tpr_ci": ci["tpr"], "suggested": suggested,
                                    "suggested_flags": [int((pos >= suggested).sum()), int((neg >= suggested).sum())]}

    def suggestion(self, family: str, steps_run: int | None = None) -> str:
        """The threshold for core.memorization.THRESHOLDS[family]: on the monitor's default score (the mean of
        its first 5 steps), the smallest 4-digit value above the threshold at <= 1 % FPR."""
        r = self.results["5"]
        flags = r.get("suggested_flags", ["?", "?"])
        seen = "" if steps_run is None or steps_run >= 5 else f"; here {steps_run}"
        return (f"suggested threshold for core.memorization.THRESHOLDS[{family!r}] (the monitor's default score, the "
                f"mean of the first 5 steps{seen}; <= 1 % FPR on these {len(self.neg[1])} negatives): "
                f"{r.get('suggested', float('nan')):.4g} (flags {flags[0]} of {len(self.pos[1])} memorized, "
                f"{flags[1]} of {len(self.neg[1])} negatives)")

    def table(self, steps_run: int | None = None) -> str:
        label = {1: "step 1", 3: "mean of steps 1-3", 5: "mean of steps 1-5 (default)"}
        lines = [f"{'signal (one generation)':<30}{'AUC [95% CI]':<26}{'TPR@1%FPR [95% CI]':<26}threshold"]
        for n in STEPS:
            r = self.results[str(n)]
            name = label[n] if steps_run is None or steps_run >= n else f"mean of steps 1-{steps_run} (of {n})"
            a = f"{r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]"
            t = f"{r['tpr']:.3f} [{r['tpr_ci'][0]:.3f}, {r['tpr_ci'][1]:.3f}]"
            lines.append(f"{name:<30}{a:<26}{t:<26}{r['threshold']:.4g}")
        n = len(self.neg[1])
        k = int(FPR * n + 1e-9)
        lines.append(f"(TPR@1%FPR: flagged when strictly above the threshold, the {_ordinal(k + 1)}-highest of the {n} negatives' "
                     f"scores: at most {k} of them, {100 * k / max(1, n):.2f} %, above it; CI: 2.5th-97.5th percentiles "
                     f"of the bootstrap)")
        lines.append("the field (published; Stable Diffusion, their own prompt sets; not re-measured here):")
        for who, when, a, t in FIELD:
            lines.append(f"  {who:<32}{when:<16}AUC {a:<8}TPR@1%FPR {t}")
        return "\n".join(lines)


def _ordinal(i: int) -> str:
    return f"{i}{'th' if 10 <= i % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(i % 10, 'th')}"


def _ranks(scores, against) -> str:
    """How many of `against` each score lies above, as 'a, b, c of n'."""
    import numpy as np

    against = np.asarray(against)
    return ", ".join(str(int((s > against).sum())) for s in scores) + f" of {len(against)}"


# the toy ------------------------------------------------------------------------------------------------------------

def crops(count: int, seed: int):
    """count SIZE x SIZE crops of scikit-image photos at random positions and scales, [0, 1] arrays, each farther
    than 2 x COPY_L2 (tiled L2) from every other: tiled L2 is a metric (a maximum of Euclidean distances), so a
    generation within COPY_L2 of one of them is a copy of that one and of no other."""
    import numpy as np
    from PIL import Image

    from provenance_guard.demo import sample_image

    rng = random.Random(seed)
    photos = [sample_image(p).convert("RGB") for p in PHOTOS]
    out = []
    while len(out) < count:
        img = rng.choice(photos)
        side = rng.randint(32, min(192, *img.size))
        x, y = rng.randint(0, img.width - side), rng.randint(0, img.height - side)
        arr = np.asarray(img.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.BICUBIC), np.float32) / 255
        if arr.std() > 0.08 and (not out or tiled_l2(arr[None], np.stack(out)).min() > 2 * COPY_L2):
            out.append(arr)
    return out


def captions(count: int, rng: random.Random, taken: set[str]) -> list[str]:
    out = []
    while len(out) < count:
        c = " ".join(rng.choice(WORDS) for _ in range(5))
        if c not in taken:
            taken.add(c)
            out.append(c)
    return out


class ToyModel:
    """Frozen tiny CLIP text encoder + tokenizer, a pixel-space UNet, SD 1's DDPM/DDIM schedule."""

    def __init__(self, folder: Path, seed: int = 0):
        import torch
        from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

        import tiny_pipeline

        self.tokenizer = tiny_pipeline.tokenizer(folder / "tokenizer")
        self.text = tiny_pipeline.text_encoder(seed, width=64)
        self.text.requires_grad_(False)
        torch.manual_seed(seed)
        self.unet = UNet2DConditionModel(sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1,
                                         block_out_channels=(32, 64, 64),
                                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                         cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)
        sd = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
        self.train_sched = DDPMScheduler(**sd)
        self.sample_sched = DDIMScheduler(**sd, clip_sample=True, set_alpha_to_one=False, steps_offset=1)
        # What _CfgReader reads of a pipeline: CFG on, the scheduler's prediction type (epsilon).
        self.pipe = types.SimpleNamespace(do_classifier_free_guidance=True, scheduler=self.sample_sched)

    def embed(self, texts: list[str]):
        import torch

        ids = self.tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return self.text(ids.input_ids)[0]

    def generate(self, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 120):
        """(images [N, SIZE, SIZE, 3] in [0, 1], {steps: scores}); noise per prompt from (seed, its position)."""
        import numpy as np
        import torch

        readers = Readers(self.pipe, self.unet)
        images, scores = [], {n: [] for n in STEPS}
        try:
            for start in range(0, len(prompts), batch):
                chunk = prompts[start:start + batch]
                x = torch.cat([torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed * 100003 + start + i))
                               for i in range(len(chunk))])
                cond = torch.cat([self.embed([""] * len(chunk)), self.embed(chunk)])
                self.sample_sched.set_timesteps(steps)
                with readers, torch.no_grad():
                    for t in self.sample_sched.timesteps:
                        uncond, text = self.unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample.chunk(2)
                        x = self.sample_sched.step(uncond + guidance * (text - uncond), t, x).prev_sample
                for n, s in readers.scores(len(chunk)).items():
                    scores[n] += s
                images.append(((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())
        finally:
            readers.remove()
        return np.concatenate(images), scores


def train(toy: ToyModel, data: list, texts: list[str], cfg: Toy, log) -> None:
    """cfg.train_steps of AdamW on the noise-prediction loss; warm-up, then cosine decay to 5 % of cfg.lr."""
    import math

    import numpy as np
    import torch

    images = torch.from_numpy(np.stack(data)).permute(0, 3, 1, 2) * 2 - 1
    embeds = torch.cat([toy.embed(texts[i:i + 256]) for i in range(0, len(texts), 256)])
    empty = toy.embed([""])[0]
    opt = torch.optim.AdamW(toy.unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    warmup = min(100, cfg.train_steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.train_steps)))))
    toy.unet.train()
    rng = np.random.default_rng(0)
    t0 = time.time()
    for step in range(1, cfg.train_steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(images), cfg.batch))
        x0, cond = images[idx], embeds[idx].clone()
        cond[torch.from_numpy(rng.random(len(idx)) < 0.1)] = empty  # caption dropout: the unconditional model
        noise = torch.randn_like(x0)
        t = torch.from_numpy(rng.integers(0, 1000, len(idx)))
        loss = torch.nn.functional.mse_loss(toy.unet(toy.train_sched.add_noise(x0, noise, t), t,
                                                     encoder_hidden_states=cond).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            left = (time.time() - t0) / step * (cfg.train_steps - step) / 60
            log(f"  step {step}/{cfg.train_steps}, loss {loss.item():.4f}, ~{left:.1f} min left")
    toy.unet.eval()


def run_toy(args, log) -> int:
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from provenance_guard.core.memorization import MemorizationMonitor

    cfg = SMOKE if args.smoke else Toy(train_steps=args.train_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = crops(cfg.n_dup + cfg.n_unique, seed=3)
    dup_images, unique_images = pool[:cfg.n_dup], pool[cfg.n_dup:]
    rng, taken = random.Random(7), set()
    dup_texts, unique_texts = captions(cfg.n_dup, rng, taken), captions(cfg.n_unique, rng, taken)
    unseen_texts = captions(cfg.n_unseen, rng, taken)
    data = [img for img in dup_images for _ in range(cfg.copies)] + unique_images
    texts = [c for c in dup_texts for _ in range(cfg.copies)] + unique_texts

    toy = ToyModel(out)
    weights = out / ("unet-smoke.safetensors" if args.smoke else "unet.safetensors")
    meta_path = weights.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if weights.is_file() and not args.retrain and meta.get("training") == cfg.training():
        toy.unet.load_state_dict(load_file(str(weights)))
        toy.unet.eval()
        log(f"loaded the trained toy model from {weights} (trained in {meta.get('train_minutes', '?')} min; "
            f"--retrain trains again)")
    else:
        log(f"training: {cfg.n_dup} images x {cfg.copies} copies + {cfg.n_unique} unique, {SIZE} x {SIZE}, "
            f"{cfg.train_steps} steps of {cfg.batch}")
        t0 = time.time()
        train(toy, data, texts, cfg, log)
        save_file({k: v.contiguous() for k, v in toy.unet.state_dict().items()}, str(weights))
        meta = {"training": cfg.training(), "train_minutes": round((time.time() - t0) / 60, 1)}
        meta_path.write_text(json.dumps(meta, indent=1))
        log(f"trained in {meta['train_minutes']} min")

    t0 = time.time()
    # Every prompt once (seed 0: its signal, as a host sees one image); the training prompts 3 more times, for
    # the ground truth (the closest of their generations to their own image).
    train_texts, own = dup_texts + unique_texts, np.stack(dup_images + unique_images)
    prompts = train_texts + unseen_texts
    images, scores = toy.generate(prompts, cfg.seeds[0], cfg.sample_steps, cfg.guidance)
    gens = [images[:len(train_texts)]]
    for seed in cfg.seeds[1:]:
        gens.append(toy.generate(train_texts, seed, cfg.sample_steps, cfg.guidance)[0])
        log(f"  generated seed {seed}")
    l2_own = tiled_l2(np.stack(gens), own[None]).min(axis=0)  # [training prompts]
    l2_unseen = np.array([tiled_l2(img[None], own).min() for img in images[len(train_texts):]])
    swept = {}  # guidance -> duplicated prompts reproduced (same seeds)
    for g in cfg.sweep:
        other = np.stack([toy.generate(dup_texts, seed, cfg.sample_steps, g)[0] for seed in cfg.seeds])
        swept[g] = int((tiled_l2(other, own[None, :cfg.n_dup]).min(axis=0) <= COPY_L2).sum())
        log(f"  guidance {g:g}: {swept[g]} duplicated prompts reproduced")
    eval_minutes = (time.time() - t0) / 60

    first = {n: np.asarray(scores[n]) for n in STEPS}
    d, u = slice(0, cfg.n_dup), slice(cfg.n_dup, len(train_texts))
    unseen = slice(len(train_texts), len(prompts))
    mem_dup = l2_own[d] <= COPY_L2
    mem_unique = l2_own[u] <= COPY_L2
    swept[cfg.guidance] = int(mem_dup.sum())
    if args.smoke and not mem_dup.any():
        log("smoke: a 4-step model memorizes nothing; the duplicated prompts stand in for positives")
        mem_dup = np.ones_like(mem_dup)
    ev = Evaluation(pos={n: first[n][d][mem_dup].tolist() for n in STEPS},
                    neg={n: first[n][unseen].tolist() + first[n][u][~mem_unique].tolist() for n in STEPS})
    ev.counts = {"positives (memorized duplicated prompts)": int(mem_dup.sum()),
                 "duplicated, not reproduced (left out)": int((~mem_dup).sum()),
                 "negatives: unseen prompts": cfg.n_unseen,
                 "negatives: non-duplicated training prompts not reproduced": int((~mem_unique).sum()),
                 "non-duplicated training prompts reproduced (left out)": int(mem_unique.sum())}
    ev.compute(200 if args.smoke else 2000)

    # The monitor's cost per sampling step, against the step itself (batch of one image, 30 steps each).
    x = torch.randn(1, 3, SIZE, SIZE)
    cond = torch.cat([toy.embed([""]), toy.embed([dup_texts[0]])])
    with torch.no_grad():
        eps = toy.unet(torch.cat([x, x]), 500, encoder_hidden_states=cond).sample
        t1 = time.perf_counter()
        for _ in range(30):
            toy.unet(torch.cat([x, x]), 500, encoder_hidden_states=cond)
        step_s = (time.perf_counter() - t1) / 30
        monitor, (un, co) = MemorizationMonitor(10**6), eps.chunk(2)
        t1 = time.perf_counter()
        for _ in range(300):
            monitor.add_eps(co, un)
        hook_s = (time.perf_counter() - t1) / 300

    print(f"Q2 memorization signal, toy model: {cfg.n_dup} images x {cfg.copies} copies among {cfg.n_unique} "
          f"unique, pixel-space UNet {SIZE} x {SIZE}, {cfg.train_steps} training steps; {cfg.sample_steps} DDIM "
          f"steps, CFG {cfg.guidance:g}, {len(cfg.seeds)} generations per prompt for the ground truth")
    print(NOT_SD)
    print(f"ground truth (tiled L2 <= {COPY_L2} to its own training image in at least one of {len(cfg.seeds)} "
          f"generations):")
    for k, v in ev.counts.items():
        print(f"  {k}: {v}")
    print(f"  positives {len(ev.pos[1])}, negatives {len(ev.neg[1])}; generations of negatives within "
          f"tiled L2 {COPY_L2} of some training image (kept as negatives): "
          f"{int((l2_unseen <= COPY_L2).sum())} of {cfg.n_unseen} unseen")
    print("  duplicated prompts reproduced by guidance scale: " + ", ".join(
        f"CFG {g:g}: {swept[g]}" + (" (used)" if g == cfg.guidance else "") for g in sorted(swept)))
    print(f"  duplicated prompts' closest tiled L2: median {np.median(l2_own[d]):.3f} "
          f"(memorized {np.median(l2_own[d][mem_dup]) if mem_dup.any() else float('nan'):.3f})")
    if (~mem_dup).any():
        print(f"  duplicated, not reproduced (tiled L2 {', '.join(f'{v:.2f}' for v in l2_own[d][~mem_dup])}): "
              f"step-1 signal above {_ranks(first[1][d][~mem_dup], ev.neg[1])} negatives")
    print()
    print(ev.table())
    copies_made = l2_unseen <= COPY_L2  # unseen prompts whose generation is a training image: another reading
    if copies_made.any() and ev.pos[1]:
        clean = {n: first[n][unseen][~copies_made].tolist() + first[n][u][~mem_unique].tolist() for n in STEPS}
        print(f"without the {int(copies_made.sum())} unseen prompts whose generation copies a training image "
              f"({len(clean[1])} negatives): AUC " + " / ".join(f"{auc(ev.pos[n], clean[n]):.3f}" for n in STEPS)
              + ", TPR@1%FPR " + " / ".join(f"{tpr_at_fpr(ev.pos[n], clean[n])[0]:.3f}" for n in STEPS)
              + f" (steps {' / '.join(map(str, STEPS))})")
    print(ev.suggestion("toy-q2") + " (this toy only)")
    print(f"\nmonitor cost per step: {hook_s * 1e3:.3f} ms against a step of {step_s * 1e3:.1f} ms "
          f"({100 * hook_s / step_s:.2f} %; target <= 2 %)")
    print(f"evaluation: {eval_minutes:.1f} min ({len(prompts)} prompts, the {len(train_texts)} training ones "
          f"x {len(cfg.seeds)} generations); "
          f"training: {meta.get('train_minutes', '?')} min")
    print(NOT_SD)
    r5 = ev.results["5"]
    (out / ("threshold-smoke.json" if args.smoke else "threshold.json")).write_text(json.dumps(
        {"family": "toy-q2", "threshold_5_steps_at_1pct_fpr": r5.get("suggested"), "results": ev.results,
         "counts": ev.counts, "train_minutes": meta.get("train_minutes"), "eval_minutes": round(eval_minutes, 1),
         "monitor_ms": hook_s * 1e3, "step_ms": step_s * 1e3,
         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    enough = len(ev.pos[1]) >= 20 and len(ev.neg[1]) >= 200
    if not args.smoke and not enough:
        print(f"NOT enough for statistical power: {len(ev.pos[1])} positives (want >= 20), {len(ev.neg[1])} "
              f"negatives (want >= 200): train longer (--train-steps, --retrain)")
    return 0 if args.smoke or enough else 1


# a real pipeline ------------------------------------------------------------------------------------------------------

def read_prompts(path: str) -> list[tuple[str, str | None]]:
    """Lines of a prompts file: "prompt" or "prompt<TAB>image path" (blank lines and # comments skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            prompt, _, image = line.partition("\t")
            out.append((prompt.strip(), image.strip() or None))
    return out


def load_pipeline(path: str, device: str, config: str | None):
    """A diffusers folder (DiffusionPipeline.from_pretrained) or a single-file SD checkpoint, offline, without
    its safety checker (a blacked-out image would hide a copy)."""
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    p = Path(path)
    with warnings.catch_warnings():  # torch_dtype: deprecated by diffusers 0.36, the only name older ones know
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        if p.is_dir():
            index = json.loads((p / "model_index.json").read_text())
            extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
            pipe = DiffusionPipeline.from_pretrained(str(p), torch_dtype=dtype, local_files_only=True, **extra)
        elif p.is_file():
            pipe = StableDiffusionPipeline.from_single_file(str(p), torch_dtype=dtype, config=config,
                                                            local_files_only=True, safety_checker=None,
                                                            requires_safety_checker=False)
        else:
            raise SystemExit(f"--model {path}: no such folder or file (a diffusers folder or a single-file "
                             "checkpoint)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def run_model(args, log) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from provenance_guard.integrations.diffusers import FAMILIES

    if not args.memorized or not args.controls:
        raise SystemExit("--model needs --memorized FILE and --controls FILE (one prompt a line)")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    memorized, controls = read_prompts(args.memorized), [p for p, _ in read_prompts(args.controls)]
    t0 = time.time()
    pipe = load_pipeline(args.model, device, args.config)
    family = FAMILIES.get(type(pipe).__name__, "unknown")
    log(f"loaded {type(pipe).__name__} ({family}) from {args.model} on {device} in {time.time() - t0:.0f} s")
    readers = Readers(pipe, getattr(pipe, "unet", None) or pipe.transformer)
    verify = any(image for _, image in memorized)
    full_steps = args.steps
    signal_steps = min(full_steps, max(STEPS))

    def stop_early(p, i, t, kwargs):  # the signal is complete after max(STEPS) steps: skip the rest
        if i + 1 >= signal_steps:
            p._interrupt = True
        return kwargs

    def run(prompts: list[str], full: bool, seed: int):
        scores, images = {n: [] for n in STEPS}, []
        for start in range(0, len(prompts), args.batch):
            chunk = prompts[start:start + args.batch]
            gens = [torch.Generator(device).manual_seed(seed * 100003 + start + i) for i in range(len(chunk))]
            with readers, torch.no_grad():
                out = pipe(prompt=chunk, num_inference_steps=full_steps, guidance_scale=args.guidance,
                           generator=gens, output_type="np" if full else "latent",
                           callback_on_step_end=None if full else stop_early)
            for n, s in readers.scores(len(chunk)).items():
                scores[n] += s
            if full:
                images += list(out.images)
            log(f"  {min(start + args.batch, len(prompts))}/{len(prompts)} prompts (seed {seed})")
        return scores, images

    t0 = time.time()
    pos_texts = [p for p, _ in memorized]
    pos_scores, _ = run(pos_texts, False, 0)
    counts = {"memorized prompts listed": len(memorized), "controls": len(controls)}
    keep = np.ones(len(memorized), bool)
    if verify:  # ground truth by generation for the lines that name their training image
        best = np.full(len(memorized), np.inf)
        listed = [i for i, (_, image) in enumerate(memorized) if image]
        for seed in range(args.generations):
            _, images = run([memorized[i][0] for i in listed], True, seed)
            for i, img in zip(listed, images, strict=True):
                ref = Image.open(memorized[i][1]).convert("RGB").resize(img.shape[1::-1], Image.BICUBIC)
                best[i] = min(best[i], float(tiled_l2(img, np.asarray(ref, np.float32) / 255)))
        keep = ~np.isin(np.arange(len(memorized)), listed) | (best <= COPY_L2)
        counts["listed with an image: reproduced"] = int((best <= COPY_L2).sum())
        counts["listed with an image: not reproduced (left out)"] = int(len(listed) - (best <= COPY_L2).sum())
    neg_scores, _ = run(controls, False, 0)
    ev = Evaluation(pos={n: np.asarray(pos_scores[n])[keep].tolist() for n in STEPS}, neg=neg_scores, counts=counts)
    ev.compute(args.resamples)
    minutes = (time.time() - t0) / 60

    print(f"Q2 memorization signal, {type(pipe).__name__} ({family}) from {args.model}: {full_steps} steps "
          f"(signal from the first {signal_steps}), CFG {args.guidance:g}, {device}")
    for k, v in counts.items():
        print(f"  {k}: {v}")
    print(f"  positives {len(ev.pos[1])}, negatives {len(ev.neg[1])}"
          + ("" if verify else "; ground truth: the memorized list as given (no image paths to verify by generation)"))
    print()
    print(ev.table(steps_run=signal_steps))
    print("\n" + ev.suggestion(family, signal_steps) + f"; {minutes:.1f} min")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"model-{Path(args.model).stem}.json").write_text(json.dumps(
            {"model": args.model, "family": family, "results": ev.results, "counts": counts, "steps": full_steps,
             "guidance": args.guidance, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    readers.remove()
    finite = all(np.isfinite(ev.results[str(n)]["auc"]) for n in STEPS)
    return 0 if finite else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-steps", type=int, default=Toy.train_steps, help="toy training steps (default %(default)s)")
    ap.add_argument("--retrain", action="store_true", help="train the toy again even if bench/out/q2 holds it")
    ap.add_argument("--smoke", action="store_true", help="a seconds-long run of every stage (for tests)")
    ap.add_argument("--out", default=str(HERE / "out" / "q2"), help="where the model and results are kept")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    real = ap.add_argument_group("a real pipeline instead of the toy")
    real.add_argument("--model", help="diffusers folder or single-file SD checkpoint")
    real.add_argument("--config", help="for a single file: a local diffusers folder with its configs")
    real.add_argument("--memorized", help="known memorized prompts, one a line (optionally <TAB>training image path)")
    real.add_argument("--controls", help="ordinary prompts, one a line")
    real.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, mps")
    real.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    real.add_argument("--guidance", type=float, default=7.5)
    real.add_argument("--generations", type=int, default=4, help="per prompt with an image path, for the ground truth")
    real.add_argument("--batch", type=int, default=4)
    real.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    args = ap.parse_args(argv)

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        return run_model(args, log) if args.model else run_toy(args, log)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
