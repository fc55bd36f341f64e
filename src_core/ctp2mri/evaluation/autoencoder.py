"""Held-out reconstruction quality of a trained VQGAN autoencoder (issue 3's first check).

The latent diffusion model can never be better than its autoencoder: ``x → E → quantise → D``
bounds what any sampler can reach. This scores that bound on a split's brain slices with the
same metrics and normalised space as `ctp2mri.evaluation.evaluate` (Table 1): MAE, lesion MAE, PSNR and
MS-SSIM per channel inside the brain.

On phantom cases it also scores the reconstruction against the *noise-free* DWI and ADC that
the phantom regenerates from each case's seed, and the noisy images themselves against those:
that is the noise floor. A ×4 autoencoder cannot carry the Rician noise of the input through
its latents, so against the noisy images it cannot score much above that floor however well it
reconstructs the anatomy and the lesion; the noise-free score is what measures that.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctp2mri.case_slices import normalisation_of
from ctp2mri.casefolder import read_case
from ctp2mri.checkpoints import load_checkpoint
from ctp2mri.data import SliceDataset, resolve_cases
from ctp2mri.devices import resolve_device
from ctp2mri.io.atomic import ensure_writable_dir
from ctp2mri.evaluation.lesion_metrics import lesion_contrast
from ctp2mri.evaluation.metrics import channel_metrics
from ctp2mri.preprocessing.preprocess import denormalise_mri, normalise_mri_like
from ctp2mri.progress import CancelToken, ProgressCallback

__all__ = ["evaluate_autoencoder", "format_autoencoder_report", "noise_free_slices"]

_log = logging.getLogger(__name__)


def evaluate_autoencoder(checkpoint: str | os.PathLike, data_dir: str | os.PathLike,
                         split: str = "val", batch_size: int = 16, device: str = "auto",
                         figure: str | os.PathLike | None = None,
                         progress: ProgressCallback | None = None,
                         cancel: CancelToken | None = None) -> dict[str, Any]:
    """Reconstruct every brain slice of ``split`` and score it against the input.

    Returns ``{"split", "slices", "cases", "metrics": {"DWI": {...}, "ADC": {...}}}`` with the
    metrics of `ctp2mri.evaluation.metrics.channel_metrics` pooled over all slices (PSNR with data range
    2 in the contract's [−1, 1] space, inside the brain). When some cases are phantom cases
    (`noise_free_slices`), also ``"noise_free": {"cases", "metrics", "noise_floor"}``: the
    reconstruction and the noisy input, each scored against the noise-free images of those cases.
    With lesion cases, ``"lesion_contrast"``: rDWI and rADC (`ctp2mri.evaluation.metrics.lesion_contrast`,
    in units) of the reconstruction and of the input, per lesion case and their mean — whether
    the lesion survives the autoencoder at all, which bounds every latent model built on it.
    ``figure``: a PNG of input and reconstruction on the largest-lesion slice of the cases with
    the largest lesions (`ctp2mri.evaluation.figures.evaluation_figure`).
    """
    if figure is not None:  # a folder that cannot be written fails before the reconstruction, not after
        ensure_writable_dir(Path(figure).parent)
    dev = resolve_device(device)
    nets, config = load_checkpoint(checkpoint, names=["model"], map_location=dev, kind="autoencoder")
    autoencoder = nets["model"].eval()
    dataset = SliceDataset(data_dir, split=split, profile=config.get("profile"), augment=False,
                           **normalisation_of(config.get("normalisation")))
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
    pred, target, brain, lesion = (torch.cat(a) for a in (preds, targets, brains, lesions))
    metrics = channel_metrics(pred, target, brain, lesion, layout="slices")
    result = {"split": split, "slices": n, "cases": len(dataset.case_names), "metrics": metrics}
    contrast = _lesion_contrasts(dataset, pred, target, brain, lesion)
    if contrast["cases"]:
        result["lesion_contrast"] = contrast
    sources = resolve_cases(data_dir, split)
    if figure is not None:
        _figure(dataset, sources, pred, figure)
    clean, rows, cases = noise_free_slices(dataset, sources)
    if cases:
        rows_t = torch.from_numpy(rows)

        def against_clean(image: torch.Tensor) -> dict[str, dict[str, float]]:
            return channel_metrics(image[rows_t], clean, brain[rows_t], lesion[rows_t], layout="slices")

        result["noise_free"] = {"cases": cases, "metrics": against_clean(pred), "noise_floor": against_clean(target)}
    return result


def _figure(dataset: SliceDataset, sources: list[Any], pred: torch.Tensor, path: str | os.PathLike) -> None:
    """Input vs reconstruction, in units, on the slice with the most lesion of each of the
    cases with the largest lesions (the most brain where no case has one)."""
    from ctp2mri.evaluation.scoring import FIGURE_ROWS
    from ctp2mri.evaluation.figures import EvaluationSlice, evaluation_figure

    per_slice = dataset.lesion[:, 0].flatten(1).sum(1)
    if not per_slice.any():
        per_slice = dataset.brain[:, 0].flatten(1).sum(1)
    totals = torch.zeros(len(dataset.case_names)).index_add_(0, dataset.case_index, per_slice.float())
    ranges = dataset.case_ranges()
    shown = []
    for i in totals.argsort(descending=True)[:FIGURE_ROWS].tolist():
        rows = torch.nonzero(dataset.case_index == i)[:, 0]
        row = int(rows[per_slice[rows].argmax()])
        name, z = dataset.case_names[i], int(dataset.slice_index[row])
        case = read_case(sources[i]) if isinstance(sources[i], (str, os.PathLike)) else sources[i]
        brain = case.mask.array[:, :, z] > 0
        ctp = case.ctp.array[:, :, z, :].astype(np.float32)
        recon = {what: denormalise_mri(pred[row, c].numpy(), *ranges[name][what], mask=brain)
                 for c, what in enumerate(("dwi", "adc"))}
        shown.append(EvaluationSlice(
            name=name, z=z, ctp=ctp[..., int(np.argmax(ctp[brain].mean(axis=0)))], dwi_true=case.dwi.array[:, :, z],
            adc_true=case.adc.array[:, :, z], dwi_pred=recon["dwi"], adc_pred=recon["adc"],
            lesion=case.lesion.array[:, :, z] > 0 if case.lesion is not None else None,
            dwi_range=ranges[name]["dwi"], model="autoencoder"))
    evaluation_figure(shown, path, predicted="reconstruction")


def _lesion_contrasts(dataset: SliceDataset, pred: torch.Tensor, target: torch.Tensor, brain: torch.Tensor,
                      lesion: torch.Tensor) -> dict[str, Any]:
    """rDWI/rADC of reconstruction and input per lesion case (in units from the case's own
    ranges) and the mean over those cases."""
    ranges = dataset.case_ranges()
    cases: dict[str, dict[str, dict[str, float]]] = {}
    for i, name in enumerate(dataset.case_names):
        rows = dataset.case_index == i
        les, br = lesion[rows, 0].numpy() > 0, brain[rows, 0].numpy() > 0
        if not les.any():
            continue
        cases[name] = {}
        for c, (channel, key) in enumerate((("DWI", "dwi"), ("ADC", "adc"))):
            lo, hi = ranges[name][key]
            cases[name][channel] = {which: lesion_contrast(denormalise_mri(images[rows, c].numpy(), lo, hi), les, br)
                                    for which, images in (("reconstruction", pred), ("input", target))}
    mean = {channel: {which: float(np.mean([v[channel][which] for v in cases.values()]))
                      for which in ("reconstruction", "input")} for channel in ("DWI", "ADC")} if cases else {}
    return {"cases": cases, "mean": mean}


def noise_free_slices(dataset: SliceDataset, sources: list[Any]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The noise-free DWI/ADC of the dataset's phantom cases, sliced and normalised as its rows.

    A case counts when its case.json names the phantom (and this phantom version) and the DWI
    and ADC that `ctp2mri.phantom.diffusion_truth` regenerates from its seed equal the files:
    a case that was edited, resampled or made by another phantom version is left out (logged),
    since its noise-free images are not known. Each case is normalised with its own (noisy)
    range, as its rows of ``dataset.target``.

    Returns
    -------
    clean, rows, cases
        ``clean`` (n, 2, H, W) float32 for the dataset rows where ``rows`` (bool, one per row) is
        True; ``cases`` the names of the cases they come from (empty: no phantom case).
    """
    from ctp2mri.phantom import PHANTOM_VERSION, diffusion_truth
    from ctp2mri.phantom.generate import DIFFUSION_VERSIONS

    rows = np.zeros(len(dataset), dtype=bool)
    parts: list[np.ndarray] = []
    cases: list[str] = []
    ranges = dataset.case_ranges()
    case_index = dataset.case_index.numpy()
    for i, (source, name) in enumerate(zip(sources, dataset.case_names)):
        case = read_case(source) if isinstance(source, (str, os.PathLike)) else source
        info = case.info or {}
        if info.get("generator") != "ctp2mri.phantom":
            continue
        if info.get("phantom_version") not in DIFFUSION_VERSIONS:
            _log.warning("case %s: phantom version %s (this is %s); no noise-free reference", name,
                         info.get("phantom_version"), PHANTOM_VERSION)
            continue
        truth = diffusion_truth(int(info["seed"]), str(info["profile"]))
        same = [truth[w].array.shape == getattr(case, w).array.shape
                and np.allclose(truth[w].array, getattr(case, w).array, rtol=1e-6, atol=1e-6) for w in ("dwi", "adc")]
        if not all(same):
            _log.warning("case %s differs from the phantom case of its seed %s (edited or resampled?); no "
                         "noise-free reference", name, info["seed"])
            continue
        mine = case_index == i
        keep = dataset.slice_index[torch.from_numpy(mine)].numpy()
        brain = case.mask.array != 0
        channels = [normalise_mri_like(truth[f"{w}_true"].array, *ranges[name][w], brain)[:, :, keep]
                    for w in ("dwi", "adc")]
        parts.append(np.stack(channels).transpose(3, 0, 1, 2).astype(np.float32))
        rows |= mine
        cases.append(name)
    h, w = dataset.target.shape[-2:]
    clean = np.concatenate(parts) if parts else np.zeros((0, 2, h, w), np.float32)
    return clean, rows, cases


def format_autoencoder_report(result: dict[str, Any]) -> str:
    """The autoencoder's reconstruction metrics as a short table."""
    lines = [f"Autoencoder reconstruction on split '{result['split']}' ({result['cases']} cases, "
             f"{result['slices']} brain slices); normalised [-1, 1] space inside the brain",
             "", "| channel | MAE↓ | Lesion MAE↓ | PSNR↑ (dB) | MS-SSIM↑ |", "|:--|--:|--:|--:|--:|"]
    for channel, m in result["metrics"].items():
        lesion = "–" if m["lesion_mae"] != m["lesion_mae"] else f"{m['lesion_mae']:.3f}"
        lines.append(f"| {channel} | {m['mae']:.3f} | {lesion} | {m['psnr']:.2f} | {m['ms_ssim']:.3f} |")
    contrast = result.get("lesion_contrast")
    if contrast:
        m = contrast["mean"]
        lines += ["", f"Lesion contrast, mean of {len(contrast['cases'])} lesion case(s) (1 = not visible): "
                  f"rDWI {m['DWI']['reconstruction']:.2f} (input {m['DWI']['input']:.2f}), "
                  f"rADC {m['ADC']['reconstruction']:.2f} (input {m['ADC']['input']:.2f})"]
    reference = result.get("noise_free")
    if reference:
        floor, recon = reference["noise_floor"], reference["metrics"]
        lines += ["", f"Against the noise-free phantom images ({len(reference['cases'])} of {result['cases']} cases):",
                  "", "| channel | reconstruction PSNR↑ (dB) | noisy input PSNR (dB), the noise floor |", "|:--|--:|--:|"]
        lines += [f"| {c} | {recon[c]['psnr']:.2f} | {floor[c]['psnr']:.2f} |" for c in recon]
        lines += ["", "Against the noisy input an autoencoder cannot score much above the noise floor: its x4 "
                  "latents do not carry the noise."]
    return "\n".join(lines)
