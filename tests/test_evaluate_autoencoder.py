"""`ctp2mri evaluate` on an autoencoder checkpoint: held-out reconstruction metrics."""

import numpy as np
import pytest
import torch
from _helpers_cldm import NORMALISATION, one_thread

from ctp2mri.checkpoints import save_checkpoint
from ctp2mri.cli import main
from ctp2mri.data import SliceDataset
from ctp2mri.errors import InputError
from ctp2mri.evaluate_autoencoder import evaluate_autoencoder, format_autoencoder_report
from ctp2mri.metrics import mae, psnr
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


def test_a_cldm_checkpoint_is_not_an_autoencoder(data, tmp_path):
    from _helpers_cldm import save_tiny_cldm

    with pytest.raises(InputError):
        evaluate_autoencoder(save_tiny_cldm(tmp_path / "cldm"), data, split="test", device="cpu")
