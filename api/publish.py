"""Diffing the declared VMs of a state against the VM objects already in the spec store.

Pure. The store applies the result inside the same transaction that read `existing`.
Generation rules (Kubernetes' with one deliberate difference):
- a new name creates an object with generation 1;
- a changed canonical spec *or labels* bumps generation by one. Labels count because they are
  Terraform-owned desired state that the controller must acknowledge via observedGeneration;
- a changed resource address alone (`terraform state mv`) updates the object, no bump;
- a name no longer declared gets a deletionTimestamp; the controller removes the object once it
  has released what the VM holds (a finalizer).
"""

from __future__ import annotations

from dataclasses import dataclass

from api.tfstate import DeclaredVM


@dataclass(frozen=True, slots=True)
class ExistingVM:
    uid: str
    name: str
    spec_hash: str
    address: str


@dataclass(frozen=True, slots=True)
class SpecChanges:
    created: tuple[DeclaredVM, ...]
    changed: tuple[tuple[ExistingVM, DeclaredVM], ...]
    moved: tuple[tuple[ExistingVM, DeclaredVM], ...]
    deleted: tuple[ExistingVM, ...]

    @property
    def is_empty(self) -> bool:
        return not (self.created or self.changed or self.moved or self.deleted)


def diff_specs(declared: tuple[DeclaredVM, ...], existing: tuple[ExistingVM, ...]) -> SpecChanges:
    """Compare the declared VMs with the live (not deleting) objects of one project."""
    existing_by_name = {vm.name: vm for vm in existing}
    declared_names = {vm.name for vm in declared}
    created, changed, moved = [], [], []
    for vm in declared:
        current = existing_by_name.get(vm.name)
        if current is None:
            created.append(vm)
        elif current.spec_hash != vm.spec_hash:
            changed.append((current, vm))
        elif current.address != vm.address:
            moved.append((current, vm))
    deleted = tuple(vm for vm in existing if vm.name not in declared_names)
    return SpecChanges(tuple(created), tuple(changed), tuple(moved), deleted)
