"""Fixtures shared by the dataset and normalisation tests: the held-out data's training cases
and their SliceDataset (float32, no augmentation)."""

from __future__ import annotations

import json

import pytest
import torch

from ctp2mri.casefolder import read_case
from ctp2mri.data import SliceDataset

ALL = ("ctp", "dwi", "adc", "lesion", "mask")


@pytest.fixture(scope="module")
def data(held_out_data):
    """Dataset seed 7, 3 cases (the session's, read-only): train = case_001 (core on 13 slices) +
    case_002 (no lesion), test = case_000; val is empty (splits need 4 cases for one)."""
    root = held_out_data
    splits = json.loads((root / "splits.json").read_text())
    cases = {name: read_case(root / name, require=ALL) for name in splits["train"]}
    return root, splits, cases


@pytest.fixture(scope="module")
def train(data):
    root, _, _ = data
    return SliceDataset(root, "train", "demo", augment=False, cache_dtype=torch.float32)


def sample_of(ds: SliceDataset, case: str, z: int) -> dict:
    i = next(i for i in range(len(ds)) if ds.case_names[int(ds.case_index[i])] == case and int(ds.slice_index[i]) == z)
    return ds[i]
