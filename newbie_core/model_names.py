"""One resolver for every model NAME (a loader widget value, a CLI `--dit NAME`): name → a path inside the
model folders, or a ModelFileError. Pure Python; ComfyUI passes `folder_paths.get_folder_paths(key)` in.

A name comes from an untrusted client (any widget value can be POSTed to /prompt), so it is treated as data:

- It must be RELATIVE and plain: no absolute path, drive letter or UNC prefix, no `.` / `..` / empty
  component, no NUL or control character, at most 1024 characters. `/` and `\\` both separate components.
  Such a name is refused outright (ComfyUI's `get_full_path` silently re-roots `../x` to `x`; we say so).
- A trailing `/` names a HF-style model FOLDER (holding `config.json`); otherwise the name must be a FILE.
- The candidate is `base/name` for each base folder in order (the models folder, then extra_model_paths).

Symlink rule (the choice): the REAL path (every link resolved) must lie inside the real path of one of the
base folders of that kind (or of `also_inside`: ComfyUI passes its whole models/ folder, so a link from
models/text_encoders/ into models/clip/ works). A link inside the folder that points elsewhere is refused by
default, and nothing behind it is opened — stricter than ComfyUI's own loaders (`get_full_path` follows any
link an administrator placed there, because it never resolves links). Models on another disk belong in
`extra_model_paths.yaml` (then they are inside a base folder). Setting the environment variable
NEWBIE_ALLOW_SYMLINKS_OUT=1 restores ComfyUI's rule for links (the name itself must still be plain). For a
folder name, links inside the folder are held to the same rule (the loaders read config.json, shards and
tokenizer files from it).

Error messages name the input (truncated, repr) and the folders; they never contain file contents.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import ModelFileError
from .files import missing_file_error

MAX_NAME_CHARS = 1024
ALLOW_LINKS_ENV = "NEWBIE_ALLOW_SYMLINKS_OUT"
_MAX_FOLDER_ENTRIES = 5000  # bounded scan of a model folder for links that leave it
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnsafeModelName(ModelFileError):
    """A model name that would leave the model folders (absolute, `..`, a link out): refused, nothing opened."""


def links_out_allowed() -> bool:
    """True when NEWBIE_ALLOW_SYMLINKS_OUT=1 (ComfyUI's own rule: follow links placed inside a models folder)."""
    return os.environ.get(ALLOW_LINKS_ENV, "").strip().lower() in ("1", "true", "yes")


def shown(name: object, limit: int = 120) -> str:
    """A user-supplied name for an error message: repr, at most `limit` characters."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 5] + "…'"


def name_parts(name: object) -> tuple[list[str], bool]:
    """Split a model name into plain components and whether it names a folder (trailing `/`).

    Raises UnsafeModelName for anything that is not a plain relative name (module docstring)."""
    if not isinstance(name, str) or not name.strip():
        raise UnsafeModelName(f"Model name {shown(name)} is empty or not text. Pick a file from the list.")
    why = None
    if len(name) > MAX_NAME_CHARS:
        why = f"it is longer than {MAX_NAME_CHARS} characters"
    elif _CONTROL.search(name):
        why = "it contains a control character"
    elif name.startswith(("/", "\\")) or _DRIVE.match(name) or os.path.isabs(name):
        why = "it is an absolute path"
    is_folder = name.endswith(("/", "\\"))
    parts = re.split(r"[/\\]", name[:-1] if is_folder else name)
    if why is None and any(p in ("", ".", "..") for p in parts):
        why = "it contains '..', '.' or an empty path component"
    if why:
        raise UnsafeModelName(
            f"Model name {shown(name)} was refused: {why}. Names are relative to the model folders (as the "
            f"loader's list shows them); nothing outside those folders is read. Pick a file from the list.")
    return parts, is_folder


def _inside(real: str, roots: Sequence[str]) -> bool:
    for root in roots:
        try:
            if os.path.commonpath([real, root]) == root:
                return True
        except ValueError:  # other drive (Windows)
            continue
    return False


def _links_out(folder: str, roots: Sequence[str]) -> str | None:
    """The first entry under `folder` (not following links) whose real path leaves `roots`, else None."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for entry in dirnames + filenames:
            seen += 1
            if seen > _MAX_FOLDER_ENTRIES:
                return None
            full = os.path.join(dirpath, entry)
            if os.path.islink(full) and not _inside(os.path.realpath(full), roots):
                return os.path.relpath(full, folder)
    return None


def resolve_model_name(name: str, bases: Iterable[str | os.PathLike], where: str = "the model folders",
                       candidates: Callable[[], list[str]] | None = None, fix: str = "",
                       allow_links_out: bool | None = None, also_inside: Iterable[str | os.PathLike] = ()) -> Path:
    """The path `name` denotes inside one of `bases` (module docstring rules), or a ModelFileError.

    `where` names the folders in messages; `candidates()` lists valid names for "close matches" (called only
    on a miss); `fix` says what to do when nothing is found. `allow_links_out` defaults to the environment
    variable NEWBIE_ALLOW_SYMLINKS_OUT; `also_inside` names more folders a link may lead into."""
    parts, is_folder = name_parts(name)
    allow = links_out_allowed() if allow_links_out is None else allow_links_out
    bases = [os.fspath(b) for b in bases]
    roots = [os.path.realpath(b) for b in list(bases) + [os.fspath(x) for x in also_inside]]
    for base in bases:
        cand = os.path.join(base, *parts)
        real = os.path.realpath(cand)
        if not os.path.exists(real):  # absent, or a dangling link: "not found" (with close matches), as ComfyUI
            continue
        if not allow and not _inside(real, roots):
            raise UnsafeModelName(
                f"Model name {shown(name)} in {where} is a symbolic link that leads outside those folders; it was "
                f"refused and nothing behind it was opened. Move the model into the folder, add its real folder "
                f"to ComfyUI's extra_model_paths.yaml, or set {ALLOW_LINKS_ENV}=1 to follow links the way "
                f"ComfyUI's own loaders do.")
        if is_folder:
            if not os.path.isfile(os.path.join(real, "config.json")):
                continue
            bad = None if allow else _links_out(real, roots)
            if bad is not None:
                raise UnsafeModelName(
                    f"Model folder {shown(name)} in {where} holds a symbolic link ({shown(bad)}) that leads outside "
                    f"the model folders; it was refused and nothing was opened. Replace the link by the file, or "
                    f"set {ALLOW_LINKS_ENV}=1 to follow links the way ComfyUI's own loaders do.")
            return Path(cand)
        if os.path.isfile(real):
            return Path(cand)
    listed = [c for c in (candidates() if candidates else []) if not c.startswith("(")]
    raise missing_file_error(name[:MAX_NAME_CHARS], where, listed, fix)


# Name fragments of each model family, for a loader combo's default (model_paths uses the same hints).
FAMILY_HINTS = {"dit": ("newbie", "transformer/"), "gemma": ("gemma", "text_encoder/"),
                "jina": ("jina", "clip_model/"), "vae": ("ae.", "flux", "vae")}


def default_choice(options: list[str], family: str) -> str:
    """The option a loader combo starts on: the first name that looks like `family` (dit, gemma, jina, vae), else
    the first option (so the Jina combo never defaults to the Gemma file)."""
    hints = FAMILY_HINTS[family]
    for hint in hints:
        for opt in options:
            if hint in opt.lower():
                return opt
    return options[0] if options else ""
