"""Point numba's on-disk kernel cache at the user cache dir before numba is first imported.

Installed packages often live in read-only site-packages (pipx, system Python), where numba's
default in-tree ``__pycache__`` cannot be written; without a writable cache every run recompiles.
A user's own ``NUMBA_CACHE_DIR`` wins.
"""

import os

import platformdirs

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(platformdirs.user_cache_dir("pipx-llama"), "numba"))
