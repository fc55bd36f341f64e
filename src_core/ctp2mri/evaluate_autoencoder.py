"""Held-out reconstruction quality of a trained VQGAN autoencoder (issue 3's first check).

The latent diffusion model can never be better than its autoencoder: ``x → E → quantise → D``
bounds what any sampler can reach. This scores that bound on a split's brain slices with the
same metrics and normalised space as `ctp2mri.evaluate` (Table 1): MAE, lesion MAE, PSNR and
MS-SSIM per channel inside the brain.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ctp2mri.checkpoints import load_checkpoint
from ctp2mri.data import SliceDataset
from ctp2mri.devices import resolve_device
from ctp2mri.metrics import channel_metrics
from ctp2mri.progress import CancelToken, ProgressCallback

__all__ = ["evaluate_autoencoder", "format_autoencoder_report"]


def evaluate_autoencoder(checkpoint: str | os.PathLike, data_dir: str | os.PathLike,
                         split: str = "val", batch_size: int = 16, device: str = "auto",
                         progress: ProgressCallback | None = None,
                         cancel: CancelToken | None = None) -> dict[str, Any]:
    """Reconstruct every brain slice of ``split`` and score it against the input.

    Returns ``{"split", "slices", "cases", "metrics": {"DWI": {...}, "ADC": {...}}}`` with the
    metrics of `ctp2mri.metrics.channel_metrics` pooled over all slices (PSNR with data range
    2 in the contract's [−1, 1] space, inside the brain).
    """
    dev = resolve_device(device)
    nets, config = load_checkpoint(checkpoint, names=["model"], map_location=dev, kind="autoencoder")
    autoencoder = nets["model"].eval()
    dataset = SliceDataset(data_dir, split=split, profile=config.get("profile"), augment=False)
    preds, targets, brains, lesions = [], [], [], []
    n = len(dataset)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            if cancel is not None:
                cancel.raise_if_cancelled()
            idx = range(start, min(start + batch_size, n))
            x = torch.stack([dataset[i]["target"] for i in idx]).to(dev)
            reconstruction, _ = autoencoder(x)
            preds.append(reconstruction.clamp(-1, 1).cpu())
            targets.append(x.cpu())
            brains.append(torch.stack([dataset[i]["brain"] for i in idx]))
            lesions.append(torch.stack([dataset[i]["lesion"] for i in idx]))
            if progress is not None:
                progress(idx.stop, n, {"slices": idx.stop})
    metrics = channel_metrics(torch.cat(preds), torch.cat(targets), torch.cat(brains),
                              torch.cat(lesions), layout="slices")
    return {"split": split, "slices": n, "cases": len(dataset.case_names), "metrics": metrics}


def format_autoencoder_report(result: dict[str, Any]) -> str:
    """The autoencoder's reconstruction metrics as a short table."""
    lines = [f"Autoencoder reconstruction on split '{result['split']}' ({result['cases']} cases, "
             f"{result['slices']} brain slices); normalised [-1, 1] space inside the brain",
             "", "| channel | MAE↓ | Lesion MAE↓ | PSNR↑ (dB) | MS-SSIM↑ |", "|:--|--:|--:|--:|--:|"]
    for channel, m in result["metrics"].items():
        lesion = "–" if m["lesion_mae"] != m["lesion_mae"] else f"{m['lesion_mae']:.3f}"
        lines.append(f"| {channel} | {m['mae']:.3f} | {lesion} | {m['psnr']:.2f} | {m['ms_ssim']:.3f} |")
    return "\n".join(lines)
