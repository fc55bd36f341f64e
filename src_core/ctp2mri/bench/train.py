"""`ctp2mri bench train`: training steps/s and peak memory on random slices."""

from __future__ import annotations

import os
import time
from typing import Any

from ctp2mri.bench.memory import PeakMemory
from ctp2mri.settings import EMA_DECAY


# training ----------------------------------------------------------------------------------------
def bench_train(profile: str = "demo", kind: str = "ldm", batch_size: int = 16, steps: int = 10,
                device: str = "auto", precision: str = "auto", warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """Training steps/s and peak memory of the profile's networks on random slices (no data needed).

    One step is what the trainers do per optimiser step: for ``ldm``, z_0 = E(x) with the frozen
    autoencoder, t and ε drawn, z_t (Eq. 2), ε̂ and the Eq. 4 loss, backward, AdamW, EMA update;
    for ``autoencoder``, the VQGAN step after ``disc_start`` (reconstruction, codebook and
    adaptive adversarial loss, then the discriminator's hinge step), the costlier phase.

    Parameters
    ----------
    profile, kind
        Network sizes (`ctp2mri.models.model_config`) and which training to time.
    batch_size, steps, warmup
        Slices per step; timed steps after ``warmup`` untimed ones.
    device, precision
        Device spec (`ctp2mri.devices`); ``auto`` precision is bf16 autocast on CUDA, fp32 elsewhere.

    Returns
    -------
    dict with ``steps_per_s``, ``slices_per_s``, ``seconds_per_step``, ``peak_memory_bytes`` (CUDA:
    ``max_memory_allocated``; CPU: peak RSS of the process) and the settings.
    """
    import torch

    from ctp2mri.devices import resolve_device_with_notice
    from ctp2mri.diffusion import NoiseSchedule
    from ctp2mri.errors import InputError
    from ctp2mri.losses import autoencoder_loss, hinge_discriminator_loss, latent_loss
    from ctp2mri.models import model_config, parameter_count
    from ctp2mri.models.autoencoder import PatchGANDiscriminator, VQAutoencoder
    from ctp2mri.models.cldm import ConditionalLDM
    from ctp2mri.profiles import get_profile
    from ctp2mri.training.ema import EMA
    from ctp2mri.training.loop import autocast, check_precision

    if kind not in ("ldm", "autoencoder"):
        raise InputError(f"unknown training kind {kind!r}; choose ldm or autoencoder")
    if steps < 1 or batch_size < 1 or warmup < 0:
        raise InputError("steps and batch size must be at least 1 (warmup at least 0)")
    prof = get_profile(profile)
    dev, notice = resolve_device_with_notice(device)
    precision = check_precision(precision, dev)
    torch.manual_seed(seed)
    h, w = prof.shape_xy
    x = torch.rand(batch_size, 2, h, w, device=dev) * 2 - 1
    c = torch.rand(batch_size, prof.n_frames, h, w, device=dev) * 2 - 1
    ae = VQAutoencoder(**model_config(prof.name, "autoencoder")).to(dev)

    if kind == "ldm":
        ae.eval().requires_grad_(False)
        model = ConditionalLDM(**model_config(prof.name, "cldm")).to(dev).train()
        ema = EMA(model, EMA_DECAY)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        schedule = NoiseSchedule().to(dev)
        n_params = parameter_count("cldm", model.config)

        def step() -> float:
            with torch.no_grad(), autocast(precision, dev):
                z0 = ae.encode(x).float()
            t = torch.randint(0, schedule.n_timesteps, (batch_size,), device=dev)
            eps = torch.randn_like(z0)
            with autocast(precision, dev):
                eps_hat = model(schedule.q_sample(z0, t, eps), t, c)
            loss = latent_loss(eps, eps_hat)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(model)
            return float(loss.detach())
    else:
        ae.train()
        disc = PatchGANDiscriminator(**model_config(prof.name, "discriminator")).to(dev).train()
        opt_ae = torch.optim.Adam(ae.parameters(), lr=1e-5, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(disc.parameters(), lr=1e-5, betas=(0.5, 0.9))
        n_params = parameter_count("autoencoder", ae.config) + parameter_count("discriminator", disc.config)

        def step() -> float:
            with autocast(precision, dev):
                x_rec, codebook = ae(x)
                disc.requires_grad_(False)
                logits_fake = disc(x_rec)
                disc.requires_grad_(True)
            loss, _ = autoencoder_loss(x, x_rec, codebook, logits_fake, ae.last_layer, 1, 0)
            opt_ae.zero_grad(set_to_none=True)
            loss.backward()
            opt_ae.step()
            with autocast(precision, dev):
                logits = disc(torch.cat([x, x_rec.detach()]))
            d_loss = hinge_discriminator_loss(*logits.split(batch_size))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            return float(loss.detach())

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    with PeakMemory() as mem:
        start = time.perf_counter()
        for _ in range(steps):
            step()  # float(loss) synchronises the device every step
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else mem.peak_rss
    return {
        "profile": prof.name, "kind": kind, "batch_size": batch_size, "steps": steps, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(), "precision": precision, "notice": notice,
        "parameters": n_params, "slice_shape": [h, w], "seconds_per_step": elapsed / steps,
        "steps_per_s": steps / elapsed, "slices_per_s": steps * batch_size / elapsed,
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": "CUDA max_memory_allocated" if dev.type == "cuda" else "process peak RSS",
    }


def format_bench_train(result: dict[str, Any]) -> str:
    """Human-readable report of `bench_train` for the CLI."""
    r = result
    lines = [(f"train benchmark: {r['kind']} ({r['parameters'] / 1e6:.1f} M parameters), {r['profile']} profile "
              f"{r['slice_shape'][0]}×{r['slice_shape'][1]} slices, batch {r['batch_size']}, {r['precision']}, "
              f"{r['device_name']} [{r['device']}], {r['threads']} threads")]
    if r.get("notice"):
        lines.append(f"  note: {r['notice']}")
    lines += [(f"  {r['steps_per_s']:8.3f} steps/s   ({r['seconds_per_step']:.2f} s per step, "
               f"{r['slices_per_s']:.1f} slices/s, {r['steps']} timed steps)"),
              f"  {r['peak_memory_bytes'] / 1024**3:8.2f} GiB peak memory ({r['peak_memory_kind']})"]
    return "\n".join(lines)
