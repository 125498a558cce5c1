"""Suite-wide test settings and the fixtures several test modules share.

OpenMP threads that busy-wait make torch 10-20x slower when the 2 CI cores are shared with
another process (a dask worker, napari's event loop); passive waiting costs nothing when idle.
It must be set before torch is first imported, which is why it lives here.
"""

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Two tiny pool phantoms and a test one as OME-Zarr (PVS and region labels inside): the
    labelling-efficiency benchmark's data at test size."""
    from napari_pvs import io  # not at collection: torch must see OMP_WAIT_POLICY first
    from napari_pvs.phantom import make_phantom

    folder = tmp_path_factory.mktemp("benchmark-data")
    paths = {}
    for name, seed in (("pool-1", 1), ("pool-2", 2), ("test-1", 3)):
        p = make_phantom((40, 48, 40), spacing=1.5, seed=seed, severity=1.0)
        paths[name] = io.save_ome_zarr(
            folder / f"{name}.zarr",
            p.image,
            p.spacing,
            labels={"pvs": p.pvs, "regions": p.regions},
            modality="T2",
            levels=1,
        )
    return paths
