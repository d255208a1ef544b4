"""Model locations as users of diffusers / transformers write them: a local path, or a Hugging Face hub id.

    "/models/PickScore_v1"                  a local folder (or file) is used as it is
    "yuvalkirstain/PickScore_v1"            a hub repository → its snapshot folder in the HF cache
    "xswu/HPSv2/HPS_v2.1_compressed.pt"     org/name/file → that one file of the repository (want="file")

Resolution goes through ``huggingface_hub`` (``snapshot_download`` / ``hf_hub_download``), so the
usual cache (``HF_HOME`` / ``HF_HUB_CACHE``), ``revision`` (branch, tag or commit) and offline mode
(``HF_HUB_OFFLINE=1``: the cache only, never the network) apply. A miss is one ``ValueError`` line.
"""

from __future__ import annotations

from pathlib import Path


def looks_like_hub_id(path: str) -> bool:
    parts = str(path).split("/")
    return not str(path).startswith((".", "/", "~")) and len(parts) >= 2 and all(parts)


def resolve_pretrained(path: str | None, field: str, want: str = "dir", revision: str | None = None) -> Path:
    """``path`` as a local Path: the path itself when it exists, else the hub repository's cached copy.

    ``want`` is "dir" (a model folder) or "file" (one weights file: ``org/name/filename``).
    """
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if path is None or not str(path).strip():
        raise ValueError(f"{field} is required (a local {'file' if want == 'file' else 'folder'} or a hub id)")
    local = Path(path).expanduser()
    if local.exists():
        if want == "file" and not local.is_file():
            raise ValueError(f"{field} {str(path)!r} is not a file")
        if want == "dir" and not local.is_dir():
            raise ValueError(f"{field} {str(path)!r} is not a folder")
        return local
    if not looks_like_hub_id(path):
        raise ValueError(f"{field} {str(path)!r} does not exist (a local path, or a hub id like org/name)")
    parts = str(path).split("/")
    repo_id = "/".join(parts[:2])
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        if want == "file":
            if len(parts) < 3:
                raise ValueError(f"{field} {str(path)!r}: name the file inside the repository, org/name/<file>")
            return Path(hf_hub_download(repo_id, "/".join(parts[2:]), revision=revision, local_files_only=offline))
        if len(parts) != 2:
            raise ValueError(f"{field} {str(path)!r}: a hub id is org/name")
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=offline))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError):
        where = "in the Hugging Face cache (offline: HF_HUB_OFFLINE=1)" if offline else "on the hub or in the cache"
        rev = f" at revision {revision!r}" if revision else ""
        raise ValueError(f"{field} {str(path)!r}: not a local path, and {repo_id}{rev} is not {where}; "
                         f"download it first (huggingface-cli download {repo_id}) or give a local path") from None
    except (HFValidationError, OSError) as e:
        raise ValueError(f"{field} {str(path)!r}: {str(e).splitlines()[0]}") from None
