"""`ctp2mri bench post-train`: lesion-aware post-training steps/s and peak memory on random slices."""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from ctp2mri.bench.memory import PeakMemory
from ctp2mri.settings import EMA_DECAY, LAMBDA_IMAGE, LAMBDA_LESION, WEIGHT_DECAY

# The paper's best weights (Table 2); any non-zero pair decodes the same amount, so the timing
# does not depend on the values, only on whether both are 0.
_LAMBDAS = (LAMBDA_IMAGE, LAMBDA_LESION)


def _random_batch(batch_size: int, n_frames: int, h: int, w: int, generator, device) -> dict[str, Any]:
    """Random slices shaped like `SliceDataset` batches: a centred elliptic brain, and a disc of
    lesion inside it on every other slice (so a batch holds both kinds, as real data do)."""
    import torch

    target = torch.rand(batch_size, 2, h, w, generator=generator) * 2 - 1
    cond = torch.rand(batch_size, n_frames, h, w, generator=generator) * 2 - 1
    yy = torch.linspace(-1, 1, h).view(h, 1)
    xx = torch.linspace(-1, 1, w).view(1, w)
    brain = ((yy / 0.8) ** 2 + (xx / 0.7) ** 2 <= 1).float().expand(batch_size, 1, h, w).contiguous()
    centre = (torch.rand(batch_size, 2, generator=generator) - 0.5) * 0.6  # well inside the brain
    radius = 0.08 + 0.1 * torch.rand(batch_size, generator=generator)
    dist2 = (yy - centre[:, 0].view(-1, 1, 1)) ** 2 + (xx - centre[:, 1].view(-1, 1, 1)) ** 2
    lesion = (dist2 <= radius.view(-1, 1, 1) ** 2).float().unsqueeze(1) * brain
    lesion[1::2] = 0
    return {k: v.to(device) for k, v in
            {"target": target, "cond": cond, "brain": brain, "lesion": lesion}.items()}


def _step(model, autoencoder, schedule, batch, generator, lambda_image, lambda_lesion, target, precision,
          gradient_checkpointing, opt, ema) -> None:
    """One post-training optimiser step, as `ctp2mri.training.post_train` takes it."""
    from ctp2mri.training.post_train import post_training_loss

    loss, _ = post_training_loss(model, autoencoder, schedule, batch, generator, lambda_image, lambda_lesion,
                                 target, precision, gradient_checkpointing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    ema.update(model)
    float(loss.detach())  # synchronises the device every step, as the trainer's logging does


def bench_post_train(profile: str = "demo", batch_size: int = 16, steps: int = 10, device: str = "auto",
                     precision: str = "auto", targets: tuple[str, ...] = ("input", "reconstruction"),
                     warmup: int = 2, seed: int = 0, gradient_checkpointing: bool = False) -> dict[str, Any]:
    """Post-training steps/s and peak memory per target, next to the plain Eq. 4 step.

    One step is what `ctp2mri.training.post_train` does per optimiser step
    (`post_training_loss`, backward, AdamW, EMA update) on random slices of the profile's
    shapes with the profile's networks (`ctp2mri.models.model_config`), untrained: z_0 = E(x),
    t and ε, ε̂, ẑ_0 (Eq. 5), x̂ = D(ẑ_0) through the frozen decoder, Eq. 8 with the paper's
    λs (0.01, 0.02). Target ``"input"`` (the paper's x) decodes once per step;
    ``"reconstruction"`` (the official code's D(z_0)) decodes z_0 as well, without gradient.
    The reference ``"eq4"`` run is λ = 0/0: no decode, the base model's LDM step.

    Parameters
    ----------
    profile
        Network and slice sizes (``demo`` or ``paper``).
    batch_size, steps, warmup
        Slices per step; timed steps after ``warmup`` untimed ones, for each variant.
    device, precision
        Device spec (`ctp2mri.devices`); ``auto`` precision is bf16 autocast on CUDA, fp32 elsewhere.
    targets
        Post-training targets to time (subset of ``("input", "reconstruction")``).
    seed
        Seeds the random slices and the noise, the same for every variant.
    gradient_checkpointing
        Recompute the decoder's activations in the backward pass (as ``post-train
        --gradient-checkpointing``).

    Returns
    -------
    dict with the settings and ``runs``: {``"eq4"``, then each target: {``steps_per_s``,
    ``seconds_per_step``, ``slices_per_s``, ``peak_memory_bytes``, ``lambda_image``,
    ``lambda_lesion``, ``decodes_per_step``}}, plus ``ratios``: {target: its steps/s over
    ``"input"``'s and over ``"eq4"``'s}. Peak memory is CUDA ``max_memory_allocated`` (reset
    per variant), or on CPU the process's peak RSS during the variant's timed steps (variants
    run cheapest first; RSS also holds what the allocator kept from earlier ones).
    """
    import torch

    from ctp2mri.devices import resolve_device_with_notice
    from ctp2mri.diffusion import NoiseSchedule
    from ctp2mri.errors import InputError
    from ctp2mri.models import model_config, parameter_count
    from ctp2mri.models.autoencoder import VQAutoencoder
    from ctp2mri.models.cldm import ConditionalLDM
    from ctp2mri.profiles import get_profile
    from ctp2mri.training.ema import EMA
    from ctp2mri.training.loop import check_precision
    from ctp2mri.training.post_train import TARGETS

    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or len(set(targets)) != len(targets):
        raise InputError(f"targets must be distinct values among {', '.join(TARGETS)}; got {', '.join(targets)}")
    if steps < 1 or batch_size < 1 or warmup < 0:
        raise InputError("steps and batch size must be at least 1 (warmup at least 0)")
    prof = get_profile(profile)
    dev, notice = resolve_device_with_notice(device)
    precision = check_precision(precision, dev)
    h, w = prof.shape_xy
    torch.manual_seed(seed)
    batch = _random_batch(batch_size, prof.n_frames, h, w, torch.Generator().manual_seed(seed), dev)
    autoencoder = VQAutoencoder(**model_config(prof.name, "autoencoder")).to(dev).eval().requires_grad_(False)
    model = ConditionalLDM(**model_config(prof.name, "cldm")).to(dev).train()
    ema = EMA(model, EMA_DECAY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=WEIGHT_DECAY)
    schedule = NoiseSchedule().to(dev)

    variants = [("eq4", 0.0, 0.0, "input")] + [(t, *_LAMBDAS, t) for t in targets]
    runs: dict[str, dict[str, Any]] = {}
    for name, lam_image, lam_lesion, target in variants:
        # Same noise stream for every variant, so they differ only in what they compute.
        generator = torch.Generator(device=dev).manual_seed(seed)
        step = functools.partial(_step, model, autoencoder, schedule, batch, generator, lam_image, lam_lesion,
                                 target, precision, gradient_checkpointing, opt, ema)
        for _ in range(warmup):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        with PeakMemory() as mem:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else mem.peak_rss
        decodes = 0 if name == "eq4" else (2 if target == "reconstruction" else 1)
        runs[name] = {"lambda_image": lam_image, "lambda_lesion": lam_lesion,
                      "target": None if name == "eq4" else target, "decodes_per_step": decodes,
                      "seconds_per_step": elapsed / steps, "steps_per_s": steps / elapsed,
                      "slices_per_s": steps * batch_size / elapsed, "peak_memory_bytes": int(peak)}

    ratios = {t: {"vs_input": runs[t]["steps_per_s"] / runs["input"]["steps_per_s"] if "input" in runs else None,
                  "vs_eq4": runs[t]["steps_per_s"] / runs["eq4"]["steps_per_s"]} for t in targets}
    return {
        "profile": prof.name, "batch_size": batch_size, "steps": steps, "warmup": warmup, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(), "precision": precision, "notice": notice,
        "gradient_checkpointing": gradient_checkpointing,
        "parameters": {"cldm": parameter_count("cldm", model.config),
                       "autoencoder": parameter_count("autoencoder", autoencoder.config)},
        "slice_shape": [h, w], "lesion_voxels": int(batch["lesion"].sum()),
        "peak_memory_kind": "CUDA max_memory_allocated" if dev.type == "cuda" else "process peak RSS",
        "runs": runs, "ratios": ratios,
    }


def format_bench_post_train(result: dict[str, Any]) -> str:
    """Human-readable report of `bench_post_train` for the CLI."""
    r = result
    p = r["parameters"]
    lines = [(f"post-train benchmark: cLDM {p['cldm'] / 1e6:.1f} M + frozen autoencoder {p['autoencoder'] / 1e6:.1f} M "
              f"parameters, {r['profile']} profile {r['slice_shape'][0]}×{r['slice_shape'][1]} slices, batch "
              f"{r['batch_size']}, {r['precision']}, {r['device_name']} [{r['device']}], {r['threads']} threads, "
              f"{r['steps']} timed steps each" + (", decoder gradient checkpointing" if r["gradient_checkpointing"]
                                                  else ""))]
    if r.get("notice"):
        lines.append(f"  note: {r['notice']}")
    labels = {"eq4": "Eq. 4 only (λ 0/0, reference)", "input": "target x (paper)",
              "reconstruction": "target D(z0) (official code)"}
    lines.append(f"  {'variant':<31} {'decodes':>7} {'steps/s':>9} {'s/step':>8} {'slices/s':>9} {'peak GiB':>9}")
    for name, run in r["runs"].items():
        lines.append(f"  {labels.get(name, name):<31} {run['decodes_per_step']:>7d} {run['steps_per_s']:>9.3f} "
                     f"{run['seconds_per_step']:>8.2f} {run['slices_per_s']:>9.1f} "
                     f"{run['peak_memory_bytes'] / 1024**3:>9.2f}")
    for name, ratio in r["ratios"].items():
        parts = [f"{ratio['vs_eq4']:.2f}× the Eq. 4 step"]
        if ratio["vs_input"] is not None and name != "input":
            parts.insert(0, f"{ratio['vs_input']:.2f}× target x")
        lines.append(f"  {labels.get(name, name)}: speed {', '.join(parts)}")
    lines.append(f"  peak memory: {r['peak_memory_kind']}")
    return "\n".join(lines)
