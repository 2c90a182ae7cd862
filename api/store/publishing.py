"""Publishing a state version: its declared VMs applied to the VM objects, in the caller's write
transaction (docs/backend.md#publishing). A version written under a lock keeps its extraction,
encoded here, until the lock is released."""

from __future__ import annotations

import json
from datetime import datetime

from api import instancetypes
from api.infra.tracing import current_traceparent
from api.publish import SpecChanges
from api.store import instancetypes as stored_types
from api.store import vms
from api.store.db import Transaction
from api.tfstate import DeclaredVM, Extraction, ExtractionProblem

ENCRYPTED_NOTE = (
    "specs unreadable: state is encrypted client-side (OpenTofu encryption_version {version}); "
    "VM specs cannot be extracted, existing VMs are left as they are"
)


async def publish_version(
    conn: Transaction,
    project: str,
    version: int,
    now: datetime,
    *,
    extraction: Extraction | None = None,
) -> SpecChanges | None:
    """Make `version` the published one and apply its declared VMs to the VM objects.

    `extraction` is the version's, when the caller has it in memory; otherwise it is read back.
    """
    row = await conn.fetchone(
        "SELECT serial, encryption_version, extraction FROM state_versions WHERE id = ?", (version,)
    )
    assert row is not None, "a published version is never removed by retention"
    serial, encryption_version, encoded = row
    await conn.execute("UPDATE projects SET published_version = ? WHERE name = ?", (version, project))
    if encryption_version is not None:
        await conn.execute(
            "UPDATE projects SET specs_note = ? WHERE name = ?",
            (ENCRYPTED_NOTE.format(version=encryption_version), project),
        )
        return None
    if extraction is None:
        extraction, trace = decode_extraction(encoded)
    else:
        trace = current_traceparent()
    await conn.execute(
        "UPDATE projects SET specs_note = NULL, spec_problems = ? WHERE name = ?",
        (json.dumps([{"address": p.address, "message": p.message} for p in extraction.problems]), project),
    )
    changes = await vms.apply_declared(
        conn, project=project, declared=extraction.vms, serial=serial, now=now, trace=trace
    )
    await stored_types.apply_declared(conn, project=project, declared=extraction.types, now=now)
    return changes


def encode_extraction(extraction: Extraction) -> str:
    return json.dumps(
        {
            "vms": [
                {
                    "name": vm.name,
                    "address": vm.address,
                    "labels": vm.labels,
                    "spec": vm.spec,
                    "error": vm.error,
                    "specHash": vm.spec_hash,
                }
                for vm in extraction.vms
            ],
            "problems": [{"address": p.address, "message": p.message} for p in extraction.problems],
            "types": instancetypes.encode_declared(extraction.types),
            # The write's request: publishing at UNLOCK links the VMs to the POST, not the UNLOCK.
            "trace": current_traceparent(),
        },
        separators=(",", ":"),
    )


def decode_extraction(encoded: str) -> tuple[Extraction, str | None]:
    """The stored extraction and the traceparent of the write that stored it."""
    document = json.loads(encoded)
    extraction = Extraction(
        vms=tuple(
            DeclaredVM(
                name=vm["name"],
                address=vm["address"],
                labels=vm["labels"],
                spec=vm["spec"],
                error=vm["error"],
                spec_hash=vm["specHash"],
            )
            for vm in document["vms"]
        ),
        problems=tuple(ExtractionProblem(p["address"], p["message"]) for p in document["problems"]),
        types=instancetypes.decode_declared(document.get("types", [])),
    )
    return extraction, document.get("trace")
