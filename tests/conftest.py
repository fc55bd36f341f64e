"""Fixtures shared by several test modules.

The session-scoped data (a phantom dataset, a phantom case, a tiny checkpoint) are made once and
handed to every module that asks: they are read-only. A test that changes such data copies it
first (``shutil.copytree`` into its ``tmp_path``); the folders are checked at the end of the
session, and the shared case's arrays refuse writes.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def notes():
    """(severity, message) of the napari notifications shown while the test runs."""
    from napari.utils.notifications import notification_manager  # only the GUI tests need napari

    seen: list[tuple[str, str]] = []

    def keep(notification):
        seen.append((str(notification.severity), str(notification.message)))
    notification_manager.notification_ready.connect(keep)
    yield seen
    notification_manager.notification_ready.disconnect(keep)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the whole module (its module-scoped fixtures included): the tiny
    networks' convolutions take ~1 ms, and on a busy 2-core machine the intra-op thread pool
    made them ~20× slower. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    from _helpers_cldm import one_thread as single_thread  # torch only where asked for

    with single_thread():
        yield


# read-only shared data ---------------------------------------------------------------------------
def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _unchanged(root: Path):
    """Yield ``root``; afterwards fail if a test added, removed or rewrote anything in it."""
    before = _listing(root)
    yield root
    after = _listing(root)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, (f"a test changed the shared, read-only {root}: {changed[:5]}; "
                         "copy it into the test's tmp_path before changing it")


@pytest.fixture(scope="session")
def phantom_data(tmp_path_factory):
    """Three demo-profile phantom cases of seed 5 (``generate_dataset(root, 3, seed=5)``; train:
    case_000 and case_002, test: case_001): the training tests' dataset. Read-only."""
    from ctp2mri.phantom import generate_dataset

    root = tmp_path_factory.mktemp("phantom_seed5") / "data"
    generate_dataset(root, 3, seed=5)
    yield from _unchanged(root)


@pytest.fixture(scope="module")
def plain(phantom_data):
    """``phantom_data``'s train split (2 cases, 58 slices) without augmentation, seed 3: the
    training tests' dataset. Module-scoped: each module gets its own dataset object."""
    from ctp2mri.data import SliceDataset

    return SliceDataset(phantom_data, split="train", seed=3, augment=False)


@pytest.fixture(scope="session")
def held_out_data(tmp_path_factory):
    """Three demo-profile phantom cases of seed 7 (``generate_dataset(root, 3, seed=7)``; train:
    case_001 and case_002, test: case_000), the held-out phantom set's first cases. Read-only."""
    from ctp2mri.phantom import generate_dataset

    root = tmp_path_factory.mktemp("phantom_seed7") / "data"
    generate_dataset(root, 3, seed=7)
    yield from _unchanged(root)


@pytest.fixture(scope="session")
def held_out_case():
    """Case 3 of the held-out phantom set (``generate_case(case_seed(7, 3))``) in memory, its
    arrays read-only (slice and ``.copy()`` to change them)."""
    from ctp2mri.phantom import case_seed, generate_case

    case = generate_case(case_seed(7, 3))
    for volume in [*case.volumes().values(), *case.truth.values()]:
        for array in (volume.array, volume.affine, volume.frame_times):
            if array is not None:
                array.flags.writeable = False
    return case


@pytest.fixture(scope="session")
def tiny_cldm(tmp_path_factory):
    """A tiny random cLDM checkpoint folder ``.../cldm`` (``save_tiny_cldm`` with its defaults:
    demo profile, seed 0, scale factor 1). Read-only."""
    from _helpers_cldm import save_tiny_cldm

    yield from _unchanged(save_tiny_cldm(tmp_path_factory.mktemp("tiny_cldm") / "cldm"))
