"""Schema migrations, applied in order: tracked with `PRAGMA user_version` in SQLite and in the
`schema_version` table in PostgreSQL, which runs the same scripts (`postgresql_script`).

Append new migrations; never edit one that has shipped. A migration is plain DDL both engines
accept once SQLite's type names are mapped (no PRAGMA, no SQLite-only syntax): the test
tests/component/test_schema.py compares a store migrated step by step with a fresh one on both.
"""

from __future__ import annotations

import re

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE projects (
        name              TEXT PRIMARY KEY,
        created_at        TEXT NOT NULL,
        current_version   INTEGER,          -- NULL: no state (never written, or deleted)
        published_version INTEGER,          -- the version whose VM specs the controller sees
        lock_id           TEXT,
        lock_info         BLOB,             -- the LOCK body, verbatim (docs/backend.md#locks)
        locked_at         TEXT,
        specs_note        TEXT,             -- why specs cannot be read, e.g. encrypted state
        spec_problems     TEXT NOT NULL DEFAULT '[]'
    );
    CREATE TABLE state_versions (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        project        TEXT NOT NULL REFERENCES projects(name) ON DELETE CASCADE,
        serial         INTEGER,
        lineage        TEXT,
        md5            TEXT NOT NULL,
        size           INTEGER NOT NULL,
        created_at     TEXT NOT NULL,
        lock_id        TEXT,
        lock_who       TEXT,
        lock_operation TEXT,
        encryption_version TEXT,            -- OpenTofu client-side encryption; NULL: plain
        body           BLOB NOT NULL,
        extraction     TEXT                 -- JSON of declared VMs and problems; NULL if encrypted
    );
    CREATE INDEX state_versions_by_project ON state_versions(project, id);
    CREATE TABLE vms (
        uid              TEXT PRIMARY KEY,
        project          TEXT NOT NULL,
        name             TEXT NOT NULL,
        generation       INTEGER NOT NULL,
        spec_hash        TEXT NOT NULL,
        spec             TEXT NOT NULL,
        spec_error       TEXT,
        labels           TEXT NOT NULL,
        address          TEXT NOT NULL,
        created_at       TEXT NOT NULL,
        spec_changed_at  TEXT NOT NULL,
        deleted_at       TEXT,
        state_serial     INTEGER NOT NULL,
        status           TEXT,              -- written only by the controller
        resource_version INTEGER NOT NULL
    );
    -- One live object per name; a deleting object may linger beside its successor.
    CREATE UNIQUE INDEX vms_live_name ON vms(project, name) WHERE deleted_at IS NULL;
    CREATE INDEX vms_by_project ON vms(project, name);
    -- A store-wide counter: every VM object change takes the next value as its resourceVersion.
    CREATE TABLE resource_versions (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
    INSERT INTO resource_versions (id, value) VALUES (1, 0);
    """,
    """
    -- Host ports held by VMs. UNIQUE makes two VMs (or two controllers) unable to share one.
    CREATE TABLE port_allocations (
        uid        TEXT NOT NULL,
        protocol   TEXT NOT NULL,
        guest_port INTEGER NOT NULL,
        host_port  INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (uid, protocol, guest_port),
        UNIQUE (protocol, host_port)
    );
    -- Disk files created for VMs, with the policy that decides their fate on delete.
    CREATE TABLE disks (
        uid            TEXT NOT NULL,
        name           TEXT NOT NULL,
        path           TEXT NOT NULL,
        reclaim_policy TEXT NOT NULL,
        created_at     TEXT NOT NULL,
        PRIMARY KEY (uid, name)
    );
    """,
    """
    -- The W3C traceparent of the request whose write set the current generation, so the
    -- reconciles that act on it can link back to it (Terraform's POST -> the VM's boot).
    ALTER TABLE vms ADD COLUMN spec_trace TEXT;
    """,
    """
    -- Whose disk it is by name, so a VM re-created under the same name finds its retained disk;
    -- its size (MiB) as last created or grown; and the base image it overlays (a path), so the
    -- image cache never collects an image a disk still reads from.
    ALTER TABLE disks ADD COLUMN project TEXT;
    ALTER TABLE disks ADD COLUMN vm_name TEXT;
    ALTER TABLE disks ADD COLUMN size_mib INTEGER;
    ALTER TABLE disks ADD COLUMN base TEXT;
    CREATE INDEX disks_by_vm_name ON disks(project, vm_name, name);
    -- What a URL's .sha256 sidecar said, so a cached image is found again after a restart
    -- without the sidecar's host.
    CREATE TABLE image_sources (
        url        TEXT PRIMARY KEY,
        digest     TEXT NOT NULL,
        fetched_at TEXT NOT NULL
    );
    """,
    """
    -- Imperative requests (stop, start, restart from the API, CLI or dashboard), as JSON
    -- (api/types.py RunOverride). Neither the Terraform-owned spec nor the controller's status:
    -- the API writes it, the controller obeys it, the API shows it in status.override.
    ALTER TABLE vms ADD COLUMN override TEXT;
    -- Objects removed by finalize, kept for a while with the resourceVersion of their removal,
    -- so a watch resumed from an older resourceVersion still sees them DELETED.
    CREATE TABLE vm_tombstones (
        uid              TEXT PRIMARY KEY,
        project          TEXT NOT NULL,
        name             TEXT NOT NULL,
        resource_version INTEGER NOT NULL,
        object           TEXT NOT NULL,    -- the last QemuVM as the API served it
        deleted_at       TEXT NOT NULL
    );
    CREATE INDEX vm_tombstones_by_version ON vm_tombstones(resource_version);
    -- The per-VM event log (Kubernetes Events, simplified). By project and name as well as uid,
    -- so a VM's history reads across its re-creations and after its deletion.
    CREATE TABLE events (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        uid      TEXT NOT NULL,
        project  TEXT NOT NULL,
        vm_name  TEXT NOT NULL,
        time     TEXT NOT NULL,
        type     TEXT NOT NULL,         -- Normal or Warning
        reason   TEXT NOT NULL,         -- CamelCase: Created, Started, ExitDetected, ...
        message  TEXT NOT NULL,
        trace_id TEXT                   -- the trace of the reconcile or request that recorded it
    );
    CREATE INDEX events_by_uid ON events(uid, id);
    CREATE INDEX events_by_vm ON events(project, vm_name, id);
    """,
    """
    -- Usage metering (docs/usage.md): what each VM used, per UTC hour, kept after the VM is gone
    -- until usage_retention_days. `hour` is the hour's start as ISO 8601 text; the sums only grow.
    CREATE TABLE vm_usage (
        uid                TEXT NOT NULL,
        hour               TEXT NOT NULL,
        project            TEXT NOT NULL,
        vm_name            TEXT NOT NULL,
        cpu_seconds        DOUBLE PRECISION NOT NULL,
        memory_mib_seconds DOUBLE PRECISION NOT NULL,
        uptime_seconds     DOUBLE PRECISION NOT NULL,
        disk_bytes         INTEGER NOT NULL,    -- allocated, at the hour's last sample
        PRIMARY KEY (uid, hour)
    );
    CREATE INDEX vm_usage_by_project ON vm_usage(project, hour);
    CREATE INDEX vm_usage_by_hour ON vm_usage(hour);
    -- The last sample counted per VM, written with the sums it completed: a restarted
    -- controller resumes its deltas from here, so nothing is counted twice or lost.
    CREATE TABLE vm_usage_cursors (
        uid         TEXT PRIMARY KEY,
        pid         INTEGER NOT NULL,
        start_ticks INTEGER NOT NULL,
        cpu_ticks   INTEGER NOT NULL,
        rss_bytes   INTEGER NOT NULL,
        sampled_at  DOUBLE PRECISION NOT NULL   -- epoch seconds
    );
    """,
    """
    -- instancetypes: QemuInstanceType and QemuPreference objects declared in a project's state
    -- (api/store/instancetypes.py); replaced at every publish, like the VMs.
    CREATE TABLE instance_types (
        project          TEXT NOT NULL,
        kind             TEXT NOT NULL,
        name             TEXT NOT NULL,
        address          TEXT NOT NULL,
        labels           TEXT NOT NULL,
        spec             TEXT NOT NULL,
        spec_error       TEXT,
        revision         TEXT NOT NULL,
        generation       INTEGER NOT NULL,
        created_at       TEXT NOT NULL,
        updated_at       TEXT NOT NULL,
        resource_version INTEGER NOT NULL,
        PRIMARY KEY (project, kind, name)
    );
    """,
    """
    -- Several hosts on one store (docs/multi-host.md). A host is a controller's machine: what it
    -- offers, whether it takes new VMs, and its lease, renewed with the database's clock.
    CREATE TABLE hosts (
        name             TEXT PRIMARY KEY,
        labels           TEXT NOT NULL,     -- JSON object, from --host-labels
        cpus             INTEGER NOT NULL,
        memory_mib       INTEGER NOT NULL,
        ports            INTEGER NOT NULL,  -- how many ports its port range holds
        cordoned         INTEGER NOT NULL DEFAULT 0,
        registered_at    TEXT NOT NULL,
        lease_renewed_at TEXT NOT NULL,     -- the database's clock (ISO 8601)
        lease_seconds    DOUBLE PRECISION NOT NULL, -- the host's own host_lease_seconds
        epoch            INTEGER NOT NULL   -- +1 at every registration: for fencing, later
    );
    -- Leases that elect one holder among processes, e.g. the one scheduler.
    CREATE TABLE leases (
        name          TEXT PRIMARY KEY,
        holder        TEXT NOT NULL,
        renewed_at    TEXT NOT NULL,        -- the database's clock
        lease_seconds DOUBLE PRECISION NOT NULL
    );
    -- Where a VM runs (NULL: not placed yet), for its whole life; why it is not placed yet.
    ALTER TABLE vms ADD COLUMN host TEXT;
    ALTER TABLE vms ADD COLUMN scheduling TEXT;
    CREATE INDEX vms_by_host ON vms(host);
    -- Ports and disks are a host's: the same port may be held on two hosts. Rows written before
    -- hosts existed have host '' until their one controller adopts them.
    CREATE TABLE port_allocations_by_host (
        host       TEXT NOT NULL DEFAULT '',
        uid        TEXT NOT NULL,
        protocol   TEXT NOT NULL,
        guest_port INTEGER NOT NULL,
        host_port  INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (uid, protocol, guest_port),
        UNIQUE (host, protocol, host_port)
    );
    INSERT INTO port_allocations_by_host (host, uid, protocol, guest_port, host_port, created_at)
        SELECT '', uid, protocol, guest_port, host_port, created_at FROM port_allocations;
    DROP TABLE port_allocations;
    ALTER TABLE port_allocations_by_host RENAME TO port_allocations;
    ALTER TABLE disks ADD COLUMN host TEXT NOT NULL DEFAULT '';
    """,
    """
    -- The fine usage series (api/store/usage_minutes.py): per VM per UTC minute, written in the
    -- sampler's round with vm_usage, kept usage_minutes_retention_hours. `minute` is the minute's
    -- start in epoch seconds, not text, so both engines sum minutes into a chart's bars in SQL.
    CREATE TABLE vm_usage_minutes (
        uid                TEXT NOT NULL,
        minute             INTEGER NOT NULL,
        project            TEXT NOT NULL,
        vm_name            TEXT NOT NULL,
        cpu_seconds        DOUBLE PRECISION NOT NULL,
        memory_mib_seconds DOUBLE PRECISION NOT NULL,
        uptime_seconds     DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (uid, minute)
    );
    CREATE INDEX vm_usage_minutes_by_vm ON vm_usage_minutes(project, vm_name, minute);
    CREATE INDEX vm_usage_minutes_by_minute ON vm_usage_minutes(minute);
    """,
    """
    -- snapshots: the controller's status of each QemuVMSnapshot and QemuVMRestore (declared in
    -- instance_types, api/store/snapshots.py), for the declared revision it was written for.
    CREATE TABLE snapshot_status (
        project    TEXT NOT NULL,
        kind       TEXT NOT NULL,
        name       TEXT NOT NULL,
        revision   TEXT NOT NULL,
        status     TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (project, kind, name)
    );
    -- Snapshots and restores asked for through the API (`tofu-qemu snapshot`), not in any state.
    CREATE TABLE requested_snapshots (
        project      TEXT NOT NULL,
        kind         TEXT NOT NULL,
        name         TEXT NOT NULL,
        spec         TEXT NOT NULL,
        revision     TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        created_at   TEXT NOT NULL,
        PRIMARY KEY (project, kind, name)
    );
    """,
    """
    -- Cheaper state writes (api/store/body_files.py): on SQLite a version's body is a file beside
    -- the store, named here, and `body` is empty. NULL: the body is in `body` (PostgreSQL, and
    -- versions written before).
    ALTER TABLE state_versions ADD COLUMN body_file TEXT;
    """,
    """
    -- hostfail14: a VM moved to another host (rescheduled, force-drained) holds ports and disks
    -- there while the rows of its old host stay until that host's controller releases them (or
    -- for good, if it never returns): the host is part of each row's key.
    CREATE TABLE port_allocations_keyed_by_host (
        host       TEXT NOT NULL DEFAULT '',
        uid        TEXT NOT NULL,
        protocol   TEXT NOT NULL,
        guest_port INTEGER NOT NULL,
        host_port  INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (host, uid, protocol, guest_port),
        UNIQUE (host, protocol, host_port)
    );
    INSERT INTO port_allocations_keyed_by_host (host, uid, protocol, guest_port, host_port, created_at)
        SELECT host, uid, protocol, guest_port, host_port, created_at FROM port_allocations;
    DROP TABLE port_allocations;
    ALTER TABLE port_allocations_keyed_by_host RENAME TO port_allocations;
    CREATE TABLE disks_keyed_by_host (
        host           TEXT NOT NULL DEFAULT '',
        uid            TEXT NOT NULL,
        name           TEXT NOT NULL,
        path           TEXT NOT NULL,
        reclaim_policy TEXT NOT NULL,
        created_at     TEXT NOT NULL,
        project        TEXT,
        vm_name        TEXT,
        size_mib       INTEGER,
        base           TEXT,
        PRIMARY KEY (host, uid, name)
    );
    INSERT INTO disks_keyed_by_host
        (host, uid, name, path, reclaim_policy, created_at, project, vm_name, size_mib, base)
        SELECT host, uid, name, path, reclaim_policy, created_at, project, vm_name, size_mib, base
        FROM disks;
    DROP TABLE disks;
    ALTER TABLE disks_keyed_by_host RENAME TO disks;
    CREATE INDEX disks_by_vm_name ON disks(project, vm_name, name);
    CREATE INDEX disks_by_uid ON disks(uid);
    """,
)


def postgresql_script(sqlite_script: str) -> str:
    """A migration as PostgreSQL runs it: the SQLite script with SQLite's types spelled as
    PostgreSQL's. Written once, so both engines hold the same tables, columns and indexes.

    - INTEGER is 64-bit in SQLite: BIGINT; AUTOINCREMENT ids are identity columns.
    - BLOB is BYTEA.
    - TEXT compares byte by byte, as in SQLite, whatever the database's default collation.
    """
    script = re.sub(
        r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b",
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        sqlite_script,
    )
    script = re.sub(r"\bINTEGER\b", "BIGINT", script)
    script = re.sub(r"\bBLOB\b", "BYTEA", script)
    return re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', script)
