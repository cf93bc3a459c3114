"""Model folders and file names: checking what a member typed, choosing a safe name from
what the source says, and the hidden name a download is written under until complete."""

from __future__ import annotations

import email.message
import re
from urllib.parse import unquote, urlsplit

from core.errors import ValidationFailed
from core.model_files.types import MODEL_EXTENSIONS, MODEL_FOLDERS

MAX_FILENAME_LENGTH = 200
TEMP_PREFIX = "."
TEMP_SUFFIX = ".part"

_FILENAME_CHARS = re.compile(r"[A-Za-z0-9._+\-=@,()\[\]]+\Z")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._+\-=@,()\[\]]+")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}\Z")


def validate_folder(folder: str) -> str:
    folder = folder.strip()
    if folder not in MODEL_FOLDERS:
        raise ValidationFailed(
            f"'{folder[:40]}' is not a model folder; use one of: {', '.join(MODEL_FOLDERS)}."
        )
    return folder


def validate_filename(name: str) -> str:
    """A plain file name for a model: no path, no leading dot, a known model extension."""
    name = name.strip()
    if not name:
        raise ValidationFailed("The file name is empty.")
    if "/" in name or "\\" in name:
        raise ValidationFailed("The file name must not contain path separators (/ or \\).")
    if name.startswith("."):
        raise ValidationFailed("The file name must not start with a dot.")
    if len(name) > MAX_FILENAME_LENGTH:
        raise ValidationFailed(f"The file name is longer than {MAX_FILENAME_LENGTH} characters.")
    if not _FILENAME_CHARS.match(name) or not name[0].isalnum():
        raise ValidationFailed(
            "The file name may only contain letters, digits and . _ - + = @ , ( ) [ ], "
            "and must start with a letter or digit."
        )
    if not name.lower().endswith(MODEL_EXTENSIONS):
        raise ValidationFailed(
            f"The file name must end in one of {', '.join(MODEL_EXTENSIONS)}."
        )
    return name


def validate_model_path(path: str) -> str:
    """A model as ComfyUI lists it: a file name, maybe in sub-folders ("sdxl/x.safetensors")."""
    parts = path.strip().split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValidationFailed("The model name must not contain empty, '.' or '..' path parts.")
    for part in parts[:-1]:
        if part.startswith(".") or not _FILENAME_CHARS.match(part):
            raise ValidationFailed(f"'{part[:40]}' is not a valid sub-folder name.")
    validate_filename(parts[-1])
    return "/".join(parts)


def validate_sha256(value: str) -> str:
    """An expected sha256 as given: 64 hex digits, returned in lower case."""
    digest = value.strip().lower()
    if not _SHA256.match(digest):
        raise ValidationFailed("The sha256 must be 64 hexadecimal characters.")
    return digest


def _clean_name(raw: str) -> str:
    """Turn a name chosen by someone else (a header, a URL) into a safe plain file name."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_CHARS.sub("_", name).lstrip("._-+=@,()[]")
    if len(name) > MAX_FILENAME_LENGTH:
        stem, dot, ext = name.rpartition(".")
        name = stem[: MAX_FILENAME_LENGTH - len(ext) - 1] + dot + ext if dot else name[:200]
    return name


def _content_disposition_name(value: str | None) -> str | None:
    if not value:
        return None
    msg = email.message.Message()
    msg["content-disposition"] = value
    try:
        name = msg.get_filename()
    except (ValueError, LookupError):  # malformed RFC 2231 parameters
        return None
    return name or None


def filename_from_source(content_disposition: str | None, url: str) -> str:
    """The file name a download gets when none was given: Content-Disposition, else the URL.

    The result is cleaned (no directories, no leading dots, odd characters replaced) and
    must still end in a model extension, otherwise the user is asked to give one.
    """
    candidates = [_content_disposition_name(content_disposition)]
    candidates.append(unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]))
    seen = ""
    for raw in candidates:
        if not raw:
            continue
        name = _clean_name(raw)
        seen = seen or name
        if name and name.lower().endswith(MODEL_EXTENSIONS):
            return validate_filename(name)
    shown = f" (the source calls it '{seen[:60]}')" if seen else ""
    raise ValidationFailed(
        f"Could not tell a model file name from the URL{shown}; give one with the filename "
        f"option, ending in one of {', '.join(MODEL_EXTENSIONS)}."
    )


def temp_name(filename: str) -> str:
    """The partial file's name: hidden (ComfyUI skips it) and stable, so a retry resumes."""
    return f"{TEMP_PREFIX}{filename}{TEMP_SUFFIX}"
