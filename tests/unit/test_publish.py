"""Diffing declared VMs against stored objects decides create, change, move and delete."""

from __future__ import annotations

from api.publish import ExistingVM, diff_specs
from api.tfstate import DeclaredVM


def declared(name: str, spec_hash: str = "h1", address: str | None = None) -> DeclaredVM:
    return DeclaredVM(
        name=name,
        address=address or f"terraform_data.vm[{name!r}]",
        labels={},
        spec={},
        error=None,
        spec_hash=spec_hash,
    )


def existing(name: str, spec_hash: str = "h1", address: str | None = None) -> ExistingVM:
    return ExistingVM(
        uid=f"uid-{name}", name=name, spec_hash=spec_hash, address=address or f"terraform_data.vm[{name!r}]"
    )


def test_new_names_are_created() -> None:
    """A declared name with no object is created."""
    changes = diff_specs((declared("a"),), ())
    assert [vm.name for vm in changes.created] == ["a"]
    assert (changes.changed, changes.moved, changes.deleted) == ((), (), ())


def test_same_hash_is_no_change() -> None:
    """An unchanged spec produces nothing to do."""
    assert diff_specs((declared("a"),), (existing("a"),)).is_empty


def test_changed_hash_is_a_change() -> None:
    """A new canonical spec (or labels) is a change, which bumps generation."""
    changes = diff_specs((declared("a", "h2"),), (existing("a", "h1"),))
    assert [(old.uid, new.spec_hash) for old, new in changes.changed] == [("uid-a", "h2")]


def test_new_address_alone_is_a_move() -> None:
    """`terraform state mv` changes the address only: a move, no generation bump."""
    changes = diff_specs((declared("a", address="module.x.terraform_data.vm"),), (existing("a"),))
    assert [new.address for _, new in changes.moved] == ["module.x.terraform_data.vm"]
    assert not changes.changed


def test_missing_names_are_deleted() -> None:
    """An object whose name is no longer declared is marked for deletion."""
    changes = diff_specs((declared("a"),), (existing("a"), existing("b")))
    assert [vm.uid for vm in changes.deleted] == ["uid-b"]


def test_empty_state_deletes_everything() -> None:
    """`terraform destroy` writes a state with no resources: every VM goes."""
    changes = diff_specs((), (existing("a"), existing("b")))
    assert {vm.name for vm in changes.deleted} == {"a", "b"}
