"""`ctp2mri bench preprocess` at a tiny size: the report is complete and physically sane."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from ctp2mri.bench import (
    BRAIN_LABELS,
    bench_preprocess,
    format_bench,
    head_labels,
    write_synthetic_ctp,
)


def test_synthetic_ctp_file_is_a_head_ctp(tmp_path):
    shape, spacing = (48, 48, 24), (5.0, 5.0, 8.0)
    path = write_synthetic_ctp(tmp_path / "ctp.nii", shape, spacing, frames=6, frame_interval=2.5)
    image = nib.load(str(path))
    assert image.shape == shape + (6,) and image.get_data_dtype() == np.int16
    assert image.header.get_zooms()[3] == 2.5
    data = np.asarray(image.dataobj)
    labels = head_labels(shape, spacing)
    assert np.all(np.abs(data[labels == 0] + 1000) <= 12)  # air
    assert np.all(np.abs(data[labels == 2] - 1000) <= 12)  # skull
    brain = data[np.isin(labels, BRAIN_LABELS)]
    assert 0 < brain.mean() < 60
    # the bolus: brain enhances after arrival (6 s) and the first frame is unenhanced
    grey = data[labels == 3].mean(axis=0)
    assert grey.argmax() > 2 and grey.max() - grey[0] > 15


def test_bench_preprocess_reports_stages_time_and_memory(tmp_path):
    result = bench_preprocess(shape=(64, 64, 40), spacing=(3.75, 3.75, 4.0), frames=5, profile="demo",
                              workdir=tmp_path)
    assert set(result["stages_s"]) == {"load", "brain_mask", "resample_ctp", "resample_mask"}
    assert all(t >= 0 for t in result["stages_s"].values())
    assert abs(result["total_s"] - sum(result["stages_s"].values())) < 0.02
    assert result["input_bytes"] == 64 * 64 * 40 * 5 * 2 and result["memory_mapped"]
    assert result["peak_rss_bytes"] >= result["baseline_rss_bytes"] > 0 and result["peak_anon_bytes"] > 0
    assert result["grid_shape"][:2] == [96, 112] and result["grid_shape"][3] == 5
    assert abs(result["mask_ml"] - 1315) < 0.1 * 1315  # the synthetic brain: 4/3·π·66·82·58 mm³
    assert list(tmp_path.iterdir()) == []  # the input is removed unless keep=True
    text = format_bench(result)
    assert "total" in text and "peak RSS" in text and "brain_mask" in text
