"""Measure ctp2mri's deconvolution against osipy's on the same phantom curves (not a test: osipy
needs Python ≥ 3.12 and is no dependency of this project).

    .venv/bin/python scripts/compare_osipy.py export CASE_FOLDER curves.npz   # in this project's env
    /path/to/py312-venv/bin/python scripts/compare_osipy.py compare curves.npz # where osipy is installed

``export`` runs `ctp2mri.perfusion.analyse_perfusion` on a phantom case folder and saves its smoothed
tissue curves, its AIF (partial-volume scaled), the frame times, the truth's CBF and Tmax and
ctp2mri's own CBF and Tmax, inside tissue. ``compare`` deconvolves the same curves with osipy's
oSVD and cSVD and prints Pearson r of CBF and Tmax MAE against the truth for both libraries.
"""

from __future__ import annotations

import sys

import numpy as np


def export(case_dir: str, out: str) -> None:
    from ctp2mri.casefolder import read_case
    from ctp2mri.perfusion import analyse_perfusion
    from ctp2mri.perfusion.curves import baseline_and_enhancement, smooth_in_region
    from ctp2mri.perfusion.validation import case_truth

    case = read_case(case_dir, require=("ctp", "mask"))
    result = analyse_perfusion(case.ctp, case.mask)
    _, enhancement = baseline_and_enhancement(case.ctp.array.astype(np.float32), result.n_baseline)
    curves = smooth_in_region(enhancement, result.tissue, result.settings.smoothing_mm, np.asarray(case.ctp.spacing))
    truth, _, _ = case_truth(case_dir)
    inside = result.tissue & (truth["cbf"] > 5) & (truth["vessel_fraction"] == 0)
    np.savez(out, curves=curves[inside], aif=result.aif.curve, times=result.times, cbf_true=truth["cbf"][inside],
             tmax_true=truth["tmax"][inside], cbf_ours=result.maps["cbf"][inside], tmax_ours=result.maps["tmax"][inside])
    print(f"{int(inside.sum())} tissue voxels → {out}")


def compare(path: str) -> None:
    from osipy.dsc.deconvolution.svd import SVDDeconvolutionParams, deconvolve_cSVD, deconvolve_oSVD

    d = np.load(path)
    for name, fn in (("osipy oSVD", deconvolve_oSVD), ("osipy cSVD", deconvolve_cSVD)):
        r = fn(d["curves"], d["aif"], d["times"], params=SVDDeconvolutionParams(method=name.split()[1]))
        cbf, delay = np.asarray(r.cbf), np.asarray(r.delay)
        print(f"{name}: r(CBF, truth) {np.corrcoef(cbf, d['cbf_true'])[0, 1]:.3f}, "
              f"Tmax MAE {np.mean(np.abs(delay - d['tmax_true'])):.2f} s")
    print(f"ctp2mri: r(CBF, truth) {np.corrcoef(d['cbf_ours'], d['cbf_true'])[0, 1]:.3f}, "
          f"Tmax MAE {np.mean(np.abs(d['tmax_ours'] - d['tmax_true'])):.2f} s")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "export":
        export(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "compare":
        compare(sys.argv[2])
    else:
        sys.exit(__doc__)
