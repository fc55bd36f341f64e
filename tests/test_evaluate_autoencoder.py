"""`ctp2mri evaluate` on an autoencoder checkpoint: held-out reconstruction metrics."""

import numpy as np
import pytest
import torch
from _helpers_cldm import NORMALISATION, one_thread

from ctp2mri.checkpoints import save_checkpoint
from ctp2mri.cli import main
from ctp2mri.data import SliceDataset
from ctp2mri.errors import InputError
from ctp2mri.evaluation.autoencoder import evaluate_autoencoder, format_autoencoder_report
from ctp2mri.evaluation.metrics import mae, psnr
from ctp2mri.models.autoencoder import VQAutoencoder
from ctp2mri.phantom import generate_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ae_eval") / "data"
    generate_dataset(root, n_cases=3, seed=3, profile="demo")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    ae = VQAutoencoder(channels=(4, 4, 4), num_res_blocks=0, num_embeddings=32,
                       mid_attention=False, norm_num_groups=4)
    path = tmp_path_factory.mktemp("ae_ckpt") / "ae"
    save_checkpoint(path, {"model": ae}, {"kind": "autoencoder", "profile": "demo",
                                          "normalisation": NORMALISATION})
    return path


def test_metrics_equal_a_direct_recomputation(data, checkpoint):
    with one_thread():
        result = evaluate_autoencoder(checkpoint, data, split="test", device="cpu", batch_size=5)
    dataset = SliceDataset(data, split="test", augment=False)
    from ctp2mri.checkpoints import load_checkpoint

    ae = load_checkpoint(checkpoint, names=["model"])[0]["model"].eval()
    with torch.no_grad(), one_thread():
        rec = ae(torch.stack([dataset[i]["target"] for i in range(len(dataset))]))[0].clamp(-1, 1)
    target = torch.stack([dataset[i]["target"] for i in range(len(dataset))])
    brain = torch.stack([dataset[i]["brain"] for i in range(len(dataset))])[:, 0] > 0
    assert result["slices"] == len(dataset)
    for c, channel in enumerate(("DWI", "ADC")):
        expected_mae = mae(rec[:, c].numpy(), target[:, c].numpy(), brain.numpy())
        expected_psnr = psnr(rec[:, c].numpy(), target[:, c].numpy(), mask=brain.numpy())
        assert result["metrics"][channel]["mae"] == pytest.approx(expected_mae, rel=1e-5)
        assert result["metrics"][channel]["psnr"] == pytest.approx(expected_psnr, rel=1e-5)
        assert np.isfinite(result["metrics"][channel]["ms_ssim"])
    assert "PSNR" in format_autoencoder_report(result)


def test_cli_dispatches_on_the_checkpoint_kind(data, checkpoint, capsys):
    with one_thread():
        assert main(["evaluate", "--model", str(checkpoint), "--data", str(data), "--split", "test",
                     "--device", "cpu"]) == 0
    assert "Autoencoder reconstruction on split 'test'" in capsys.readouterr().out


def test_cli_refuses_per_case_outputs_for_an_autoencoder(data, checkpoint, tmp_path, capsys):
    """Its metrics are pooled over slices: --out/--table used to be ignored silently."""
    out = tmp_path / "per_case.csv"
    assert main(["evaluate", "--model", str(checkpoint), "--data", str(data), "--out", str(out),
                 "--device", "cpu"]) == 2
    assert "--out applies to diffusion models and baselines" in capsys.readouterr().err
    assert not out.exists()


def test_a_cldm_checkpoint_is_not_an_autoencoder(data, tiny_cldm):
    with pytest.raises(InputError):
        evaluate_autoencoder(tiny_cldm, data, split="test", device="cpu")


def _recon_and_truth(data, checkpoint, split):
    """Reconstruction, noisy target, noise-free target (normalised with the noisy ranges), brain."""
    import json

    from ctp2mri.checkpoints import load_checkpoint
    from ctp2mri.phantom import phantom_maps
    from ctp2mri.preprocessing.preprocess import normalise_mri
    from ctp2mri.settings import ADC_WINDOW

    dataset = SliceDataset(data, split=split, augment=False)
    ae = load_checkpoint(checkpoint, names=["model"])[0]["model"].eval()
    seeds = json.loads((data / "splits.json").read_text())["case_seeds"]
    clean = []
    for name in dataset.case_names:  # an independent path: the full simulation, normalised anew
        maps = phantom_maps(seeds[name], "demo")
        brain = _brain_of(data / name)
        keep = dataset.slice_index[dataset.case_index == dataset.case_names.index(name)].numpy()
        chans = []
        for w in ("dwi", "adc"):  # DWI: the case's quantiles; ADC: the fixed window (physical units)
            lo, hi = normalise_mri(_image_of(data / name, w), brain)[1] if w == "dwi" else ADC_WINDOW
            c = np.clip((np.clip(maps[f"{w}_true"].array, lo, hi) - lo) * 2 / (hi - lo) - 1, -1, 1) * brain
            chans.append(c[:, :, keep])
        clean.append(np.stack(chans).transpose(3, 0, 1, 2))
    x = torch.stack([dataset[i]["target"] for i in range(len(dataset))])
    with torch.no_grad(), one_thread():
        rec = ae(x)[0].clamp(-1, 1)
    brain = torch.stack([dataset[i]["brain"] for i in range(len(dataset))])[:, 0].numpy() > 0
    return rec.numpy(), x.numpy(), np.concatenate(clean), brain


def _brain_of(folder):
    import nibabel as nib

    return np.asarray(nib.load(folder / "mask.nii.gz").dataobj) != 0


def _image_of(folder, what):
    import nibabel as nib

    return np.asarray(nib.load(folder / f"{what}.nii.gz").dataobj, dtype=np.float32)


def test_phantom_cases_are_also_scored_against_their_noise_free_images(data, checkpoint):
    with one_thread():
        result = evaluate_autoencoder(checkpoint, data, split="train", device="cpu", batch_size=8)
    reference = result["noise_free"]
    assert reference["cases"] == SliceDataset(data, split="train", augment=False).case_names
    rec, noisy, clean, brain = _recon_and_truth(data, checkpoint, "train")
    for c, channel in enumerate(("DWI", "ADC")):
        floor = psnr(noisy[:, c], clean[:, c], mask=brain)
        assert reference["noise_floor"][channel]["psnr"] == pytest.approx(floor, rel=1e-5)
        assert reference["metrics"][channel]["psnr"] == pytest.approx(psnr(rec[:, c], clean[:, c], mask=brain),
                                                                     rel=1e-5)
    # The phantom's Rician noise (SNR 20–30 on grey matter) costs DWI more than ADC.
    assert 20 < reference["noise_floor"]["DWI"]["psnr"] < reference["noise_floor"]["ADC"]["psnr"] < 45
    report = format_autoencoder_report(result)
    assert "Against the noise-free phantom images (2 of 2 cases)" in report and "noise floor" in report


def test_edited_or_foreign_cases_get_no_noise_free_reference(data, checkpoint, tmp_path, caplog):
    import json
    import shutil

    import nibabel as nib

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    names = SliceDataset(copy, split="train", augment=False).case_names
    edited = copy / names[0] / "dwi.nii.gz"  # e.g. a user's denoised DWI: no longer the seed's case
    img = nib.load(edited)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * np.float32(1.01), img.affine, img.header), edited)
    with one_thread(), caplog.at_level("WARNING"):
        result = evaluate_autoencoder(checkpoint, copy, split="train", device="cpu")
    assert result["noise_free"]["cases"] == names[1:]
    assert f"case {names[0]} differs from the phantom case of its seed" in caplog.text

    info = copy / names[1] / "case.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "generator": "a scanner"}))
    with one_thread():
        result = evaluate_autoencoder(checkpoint, copy, split="train", device="cpu")
    assert "noise_free" not in result  # no phantom case left: the report is the plain table
    assert "noise-free" not in format_autoencoder_report(result)
    assert result["metrics"]["DWI"]["psnr"] > 0


def test_lesion_contrast_of_reconstruction_and_input_per_lesion_case(data, checkpoint):
    from ctp2mri.evaluation.lesion_metrics import lesion_contrast
    from ctp2mri.preprocessing.preprocess import denormalise_mri

    with one_thread():
        result = evaluate_autoencoder(checkpoint, data, split="train", device="cpu", batch_size=8)
    dataset = SliceDataset(data, split="train", augment=False)
    rec, noisy, _, brain = _recon_and_truth(data, checkpoint, "train")
    lesion = dataset.lesion[:, 0].numpy() > 0
    contrast = result["lesion_contrast"]
    with_lesion = [n for i, n in enumerate(dataset.case_names) if lesion[dataset.case_index.numpy() == i].any()]
    assert sorted(contrast["cases"]) == sorted(with_lesion) and with_lesion
    for name in with_lesion:
        rows = dataset.case_index.numpy() == dataset.case_names.index(name)
        for c, (channel, key) in enumerate((("DWI", "dwi"), ("ADC", "adc"))):
            lo, hi = dataset.case_ranges()[name][key]
            for which, images in (("reconstruction", rec), ("input", noisy)):
                expected = lesion_contrast(denormalise_mri(images[rows, c], lo, hi), lesion[rows], brain[rows])
                assert contrast["cases"][name][channel][which] == pytest.approx(expected, rel=1e-6)
    # the phantom's core: bright on DWI, dark on ADC
    assert contrast["mean"]["DWI"]["input"] > 1.05 and contrast["mean"]["ADC"]["input"] < 0.95
    assert "Lesion contrast, mean of" in format_autoencoder_report(result)


def test_figure_shows_input_and_reconstruction_on_the_largest_lesions(data, checkpoint, tmp_path, capsys):
    png = tmp_path / "ae.png"
    with one_thread():
        assert main(["evaluate", "--model", str(checkpoint), "--data", str(data), "--split", "train",
                     "--device", "cpu", "--figure", str(png)]) == 0
    assert f"figure: {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert width > height > 100  # one row per case (2 here), five panels each
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="is a file"):  # refused before any reconstruction
        evaluate_autoencoder(checkpoint, data, split="train", device="cpu", figure=blocker / "ae.png")
