"""The state file of a running `research-service dev` (`make run`): `.data/dev-stack.json`.

`dev` writes where its API, database and Redis are (the embedded servers' ports change on every
start) and removes the file when it stops; `keys`, `migrate` and `chat` read it when
DATABASE_URL / RESEARCH_API_URL are unset, so they work in another terminal without exports.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

STATE_FILE = "dev-stack.json"


def data_dir() -> Path:
    """RESEARCH_DATA_DIR, else `.data` in the current folder (where `make` runs)."""
    return Path(os.environ.get("RESEARCH_DATA_DIR") or ".data")


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Replace the state file atomically; readable by its owner only (URLs may hold passwords)."""
    path = folder / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.chmod(0o600)
    os.replace(tmp, path)


def remove_state(folder: Path) -> None:
    with contextlib.suppress(OSError):
        (folder / STATE_FILE).unlink()


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def read_state(folder: Path | None = None) -> dict[str, Any] | None:
    """The running dev stack's state, or None when none runs (no file, or its `dev` is gone)."""
    try:
        state = json.loads(((folder or data_dir()) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and _alive(state.get("pid")) else None
