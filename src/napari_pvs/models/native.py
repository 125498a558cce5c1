"""Loading torch's native libraries without holding the GIL, for threads beside a GUI.

``import torch`` first loads its shared libraries (about 400 MB: libtorch_cpu and what it
needs), and Python's importer does that holding the GIL: a worker thread that imports torch
froze napari's GUI thread for 160-180 ms on the 2-core machine (the longest of a 5 ms
heartbeat's waits). A call into C through :mod:`ctypes` releases the GIL, so loading the same
libraries first by calling the C library's ``dlopen`` costs the GUI thread nothing; the import
that follows finds them loaded (the same files, by their names) and holds the GIL only to set
up torch's Python bindings: 30-100 ms at most, measured the same way.

Nothing here imports torch (its package is found without being imported), and nothing fails:
where the libraries or ``dlopen`` cannot be found (another platform, another torch layout), the
import simply loads them itself, as it would have.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import threading
from pathlib import Path

#: The library torch's Python extension needs; loading it loads every other one it links to.
_PYTHON_BINDINGS = {"linux": "libtorch_python.so", "darwin": "libtorch_python.dylib"}
#: dlopen's flags: bind every symbol now (in the GIL-free call, not at first use), keep the
#: symbols local, as Python's importer does.
_RTLD_NOW = 2

_lock = threading.Lock()
_loaded: list[bool] = []


def torch_library_path() -> Path | None:
    """Where torch's Python bindings library is, without importing torch; None when there is
    none to preload (torch missing, another platform or layout)."""
    name = next((v for k, v in _PYTHON_BINDINGS.items() if sys.platform.startswith(k)), None)
    if name is None:
        return None
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        return None
    path = Path(next(iter(locations))) / "lib" / name
    return path if path.is_file() else None


def preload_torch_libraries() -> bool:
    """Load torch's native libraries with the GIL released (see the module docstring), once;
    True when they are loaded (by this call, an earlier one or torch itself)."""
    if "torch._C" in sys.modules:
        return True
    with _lock:
        if _loaded:
            return _loaded[0]
        _loaded.append(_dlopen(torch_library_path()))
        return _loaded[0]


def _dlopen(path: Path | None) -> bool:
    if path is None:
        return False
    try:
        dlopen = ctypes.CDLL(None).dlopen  # libc's (or libdl's), in the process already
    except (OSError, AttributeError):
        return False
    dlopen.restype = ctypes.c_void_p
    dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return bool(dlopen(os.fsencode(path), _RTLD_NOW))  # a foreign call: the GIL is released
