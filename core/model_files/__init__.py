"""Model files on the GPU servers: what each server has, downloading new ones, deleting old
ones. (Not to be confused with :mod:`core.db.models`, the database tables.)

Listing asks ComfyUI (``GET /models/{folder}``) when it answers and falls back to reading
``<install>/models/<folder>`` over SSH when it does not; results are cached per server and
refreshed after every change and on demand.

Downloads run **on the server** with curl over SSH; model files never pass through the bot.
Each one is checked before anything is written: https only (http only for hosts in
``comfy.http_allowlist``), a folder from :data:`MODEL_FOLDERS`, a plain file name with a known
model extension, the source answering a one-byte range probe, and enough free disk (a real
``df -Pk``). curl writes to a hidden temporary name in the target folder, which a later run
resumes, and the file is renamed only once it is complete (and its sha256 matches, when one
was given). The URL and the Hugging Face / Civitai tokens reach curl through a config file
on its stdin (``curl -K -``), so neither appears in the server's process list nor in our logs.

Modules, each depending only on those above it:

- ``types``: folders, extensions, views, requests, the observer, errors;
- ``names``: folder and file-name checks; ``curl``: curl's config and progress meter;
- ``shell``: reaching a server over SSH and reading our scripts' output;
- ``sources``: URL checks, redaction, tokens, probing the source;
- ``listing``: per-folder listings (ComfyUI, else SSH), cached;
- ``planning``: every check before a download; ``transfer``: curl and the final rename;
- ``usage``: file sizes over SSH, last use and need from the generation rows, the pins;
- ``cache``: keeps each server under ``comfy.model_cache_size`` (evicts LRU, never a
  model a job needs, never a pinned one);
- ``store``: the download rows; ``downloads``: DownloadService, one task per download;
- ``deletion``: deleting a file; ``service``: the ModelService facade.
"""

from core.model_files.cache import CacheEntry, CacheReport, ModelCache
from core.model_files.curl import CurlMeter, CurlProgress, curl_config, parse_curl_size
from core.model_files.names import (
    filename_from_source,
    temp_name,
    validate_filename,
    validate_folder,
    validate_model_path,
)
from core.model_files.service import ModelService, parse_model_spec
from core.model_files.shell import parse_df_available
from core.model_files.sources import validate_url
from core.model_files.types import (
    DEFAULT_INSTALL_DIR,
    MODEL_EXTENSIONS,
    MODEL_FOLDERS,
    DiskFull,
    DownloadFailed,
    DownloadObserver,
    DownloadRequest,
    DownloadView,
    InstallDir,
    ModelListing,
    SourceError,
    format_size,
)
from core.redact import redact_url

__all__ = [
    "DEFAULT_INSTALL_DIR",
    "MODEL_EXTENSIONS",
    "MODEL_FOLDERS",
    "CacheEntry",
    "CacheReport",
    "CurlMeter",
    "CurlProgress",
    "DiskFull",
    "DownloadFailed",
    "DownloadObserver",
    "DownloadRequest",
    "DownloadView",
    "InstallDir",
    "ModelCache",
    "ModelListing",
    "ModelService",
    "SourceError",
    "curl_config",
    "filename_from_source",
    "format_size",
    "parse_curl_size",
    "parse_df_available",
    "parse_model_spec",
    "redact_url",
    "temp_name",
    "validate_filename",
    "validate_folder",
    "validate_model_path",
    "validate_url",
]
