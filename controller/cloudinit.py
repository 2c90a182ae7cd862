"""The files of a cloud-init NoCloud seed, rendered from a spec's `cloudInit`. Pure: no I/O.

The seed is a CD-ROM labelled `cidata` holding `user-data`, `meta-data` and, when given,
`network-config` (cloud-init docs, "Datasource NoCloud"). resources/seed.py writes the ISO.

Invariants:
- Output is deterministic: the same spec, uid and name give byte-identical files, so
  `seed_digest` (which names the ISO, and so appears in QEMU's argv) changes only when content does.
- YAML files are written as JSON, which is YAML: no YAML library, and no YAML ambiguity
  (`no` meaning false, `1.10` meaning 1.1) in what we generate.
- `instance-id` depends on the uid and the cloud-init config only, never on `generation`:
  cloud-init treats a new instance-id as a new machine (it re-runs per-instance modules and
  regenerates SSH host keys), which a memory or CPU change must not cause.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from api.types import CloudInitSpec

USER_DATA = "user-data"
META_DATA = "meta-data"
NETWORK_CONFIG = "network-config"
CLOUD_CONFIG_HEADER = "#cloud-config\n"
# An empty #cloud-config: valid YAML (an empty mapping), so cloud-init runs its defaults.
EMPTY_USER_DATA = CLOUD_CONFIG_HEADER + "{}\n"
INSTANCE_ID_UID_CHARS = 8
INSTANCE_ID_CONFIG_CHARS = 12
SEED_DIGEST_CHARS = 16


def seed_files(cloud_init: CloudInitSpec, *, uid: str, name: str) -> dict[str, bytes]:
    """The NoCloud files for one VM: `user-data`, `meta-data`, and `network-config` when given.

    meta-data holds `instance-id`, `local-hostname` (the VM name) and, when there are SSH keys,
    `public-keys`: NoCloud reads keys from meta-data whatever user-data is (even a shell script).
    The user's `metaData` keys are applied last, so they override any of these.
    """
    files = {
        USER_DATA: render_user_data(cloud_init.user_data),
        META_DATA: render_meta_data(cloud_init, uid=uid, name=name),
    }
    if cloud_init.network_config is not None:
        files[NETWORK_CONFIG] = _json_document(cloud_init.network_config)
    return files


def render_user_data(user_data: str | dict[str, Any] | None) -> bytes:
    """Text goes in byte for byte (it may be a script or a MIME multipart, not cloud-config);
    an object becomes a #cloud-config document."""
    if user_data is None:
        return EMPTY_USER_DATA.encode()
    if isinstance(user_data, str):
        return user_data.encode()
    return CLOUD_CONFIG_HEADER.encode() + _json_document(user_data)


def render_meta_data(cloud_init: CloudInitSpec, *, uid: str, name: str) -> bytes:
    meta: dict[str, Any] = {"instance-id": instance_id(cloud_init, uid=uid), "local-hostname": name}
    if cloud_init.ssh_authorized_keys:
        meta["public-keys"] = list(cloud_init.ssh_authorized_keys)
    meta.update(cloud_init.meta_data)
    return _json_document(meta)


def instance_id(cloud_init: CloudInitSpec, *, uid: str) -> str:
    """`i-<uid prefix>-<config hash>`: stable across restarts and generation bumps that leave
    cloud-init alone, new when the cloud-init config changes (so cloud-init applies it)."""
    canonical = json.dumps(cloud_init.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
    config_hash = hashlib.sha256(canonical.encode()).hexdigest()[:INSTANCE_ID_CONFIG_CHARS]
    uid_prefix = uid.replace("-", "").lower()[:INSTANCE_ID_UID_CHARS]
    return f"i-{uid_prefix}-{config_hash}"


def seed_digest(files: Mapping[str, bytes]) -> str:
    """A short hex digest of the files' names and bytes, to name the ISO (`cidata-<digest>.iso`).

    Each name and body is length-prefixed, so no two different file sets hash the same input.
    """
    digest = hashlib.sha256()
    for file_name in sorted(files):
        for part in (file_name.encode(), files[file_name]):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()[:SEED_DIGEST_CHARS]


def _json_document(value: Mapping[str, Any]) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
