"""Where the offline data lives: one setting, ``AETHERIS_DATA_DIR``.

Real users fetch data from the hub; on machines without network the project reads the offline
copies under this folder (XCOPA, MGSM, xSID, NTREX-128 + NusaX + MAFAND, the language table).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "AETHERIS_DATA_DIR"


def data_dir() -> Path | None:
    """The offline data folder, or None when the setting is unset."""
    value = os.environ.get(ENV_VAR)
    return Path(value).expanduser() if value else None


def data_path(*parts: str, what: str = "this data") -> Path:
    """Path to a file or folder under the data dir; a clear error when it is not there."""
    root = data_dir()
    if root is None:
        raise FileNotFoundError(
            f"{what} is read from the offline data folder, but {ENV_VAR} is not set. "
            f"Set {ENV_VAR}=/path/to/shared/data (the Makefile points it at ../shared/data), "
            "or pass a hub dataset / local file path instead."
        )
    path = root.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{what} was expected at {path}, which does not exist. Check {ENV_VAR}={root} "
            "(it should contain corpus/, xcopa/, mgsm/, toolcall/ and lang_meta/)."
        )
    return path
