"""`bench_post_train`: one tiny run of each variant on the demo networks (no timing assertions)."""

import pytest

from ctp2mri.errors import InputError


def test_bench_post_train_times_both_targets_and_the_eq4_reference():
    from ctp2mri.bench import bench_post_train, format_bench_post_train

    r = bench_post_train("demo", batch_size=1, steps=1, warmup=0, device="cpu")
    assert list(r["runs"]) == ["eq4", "input", "reconstruction"]
    assert [run["decodes_per_step"] for run in r["runs"].values()] == [0, 1, 2]
    assert r["runs"]["eq4"]["lambda_image"] == r["runs"]["eq4"]["lambda_lesion"] == 0
    assert r["runs"]["input"]["lambda_image"] > 0 and r["runs"]["input"]["lambda_lesion"] > 0
    assert r["lesion_voxels"] > 0  # otherwise the lesion term would not be exercised
    for run in r["runs"].values():
        assert run["steps_per_s"] > 0 and run["peak_memory_bytes"] > 0
        assert run["seconds_per_step"] == pytest.approx(1 / run["steps_per_s"])
        assert run["slices_per_s"] == pytest.approx(run["steps_per_s"])
    ratio = r["ratios"]["reconstruction"]
    assert ratio["vs_input"] == pytest.approx(r["runs"]["reconstruction"]["steps_per_s"]
                                              / r["runs"]["input"]["steps_per_s"])
    text = format_bench_post_train(r)
    assert "steps/s" in text and "target x (paper)" in text and "target D(z0)" in text and "Eq. 4" in text


def test_bench_post_train_refuses_unknown_targets():
    from ctp2mri.bench import bench_post_train

    with pytest.raises(InputError, match="targets"):
        bench_post_train("demo", steps=1, targets=("x",), device="cpu")
