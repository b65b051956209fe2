"""A trained student's folder, as far as a path can tell without a model library: what
`modeling.load_student` checks first, and the tools check among their arguments before torch loads."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

FOLDER_HINT = "pass a folder written by training, e.g. runs/<run_name>/student_best"


def student_folder_problem(folder: Path) -> Optional[str]:
    """Why `folder` cannot be a student folder, before any file in it is read; None if it may be."""
    if not folder.exists():
        return f"{folder} does not exist; {FOLDER_HINT}"
    if not folder.is_dir():
        return f"{folder} is a file, not a student folder; {FOLDER_HINT}"
    return None
