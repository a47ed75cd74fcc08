"""The images of a folder: one rule for every command that walks one (``ornis embed``, ``ornis train``, ...).

- An image is a file whose extension is one of ``IMAGE_EXTENSIONS`` (case-insensitive: ``.JPG`` counts).
- A hidden file or folder (its name starts with ``.``) is left out, with everything under it.
- A folder is walked recursively in sorted order: a folder's own files (sorted by name) come before its
  sub-folders' (sorted by name, each walked the same way).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from ornis.data.decode import IMAGE_EXTENSIONS, is_image_name
from ornis.utils.storage import RemotePath, storage_errors

__all__ = ["IMAGE_EXTENSIONS", "is_hidden", "is_image_name", "sub_folders", "walk_images", "walk_remote_images"]


def is_hidden(name: str) -> bool:
    """Whether a file or folder name (not a path) is hidden: it starts with a dot, as ``.DS_Store``, ``.git`` or the
    ``._photo.jpg`` companions macOS writes beside every file on a foreign disk."""
    return name.startswith(".")


def walk_images(folder: str | os.PathLike, onerror: Callable[[OSError], None] | None = None) -> Iterator[str]:
    """Every image under ``folder`` in the walk order the module doc describes, as ``os.path.join`` paths.
    ``onerror`` is called with the ``OSError`` of each folder that cannot be listed (by default those are left out
    without a word, as ``os.walk`` does)."""
    for root, dirs, names in os.walk(folder, onerror=onerror):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        for name in sorted(names):
            if not is_hidden(name) and is_image_name(name):
                yield os.path.join(root, name)


def walk_remote_images(folder: RemotePath) -> list[str]:
    """``walk_images`` for a folder in object storage: one recursive prefix listing (no request per sub-folder),
    put in the same order and filtered by the same rules; the images as URLs under ``folder``."""
    fs, root = folder.fs_path()
    with storage_errors(folder):
        found = fs.find(root)
    prefix = root.rstrip("/") + "/"
    images = []
    for key in found:
        parts = key[len(prefix) :].split("/") if key.startswith(prefix) else []
        if parts and not any(is_hidden(p) for p in parts) and is_image_name(parts[-1]):
            images.append(parts)
    # os.walk's order: a folder's own files (0) before its sub-folders (1), names sorted at every level
    images.sort(key=lambda parts: [(1, d) for d in parts[:-1]] + [(0, parts[-1])])
    return [f"{folder.url}/{'/'.join(parts)}" for parts in images]


def sub_folders(folder: str | os.PathLike) -> list[str]:
    """The names of ``folder``'s visible sub-folders, sorted (the classes of an ImageFolder layout)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not is_hidden(e.name))
