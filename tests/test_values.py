"""@value gives what @dataclass(frozen=True) gives: the same equality, hash, repr, replace, match and frozenness."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from shmguard.values import Value, value

pytestmark = pytest.mark.pure


@value
class Shared(Value):
    peer: int
    vector: int = 0
    tags: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Shared2:  # the same class as dataclass writes it, under a name of the same length for the repr
    peer: int
    vector: int = 0
    tags: tuple[str, ...] = field(default_factory=tuple)


@value
class Other(Value):
    peer: int
    vector: int = 0
    tags: tuple[str, ...] = ()


CASES = [(1,), (1, 2), (1, 2, ("a",)), (0, 0, ())]


@pytest.mark.parametrize("args", CASES)
def test_equality_hash_and_repr_are_dataclass_s(args):
    ours, theirs = Shared(*args), Shared2(*args)
    assert repr(ours) == repr(theirs).replace("Shared2", "Shared")
    assert hash(ours) == hash(theirs)
    for other in CASES:
        assert (ours == Shared(*other)) == (theirs == Shared2(*other))
        assert (ours != Shared(*other)) == (theirs != Shared2(*other))


def test_another_class_with_the_same_fields_is_not_equal():
    assert Shared(1, 2, ()) != Other(1, 2, ())
    assert Shared(1) != (1, 0, ())
    assert len({Shared(1), Shared(1), Shared(2)}) == 2


def test_frozen_replace_fields_and_match():
    item = Shared(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.peer = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        del item.vector
    assert dataclasses.replace(item, vector=5) == Shared(1, 5)
    assert [f.name for f in dataclasses.fields(item)] == ["peer", "vector", "tags"]
    match item:
        case Shared(peer, vector):
            assert (peer, vector) == (1, 2)
        case _:
            pytest.fail("no match")


def test_a_field_that_opts_out_is_refused():
    with pytest.raises(TypeError, match="compare, repr, hash"):
        @value
        class Partial(Value):
            peer: int
            note: str = field(default="", compare=False)

    with pytest.raises(TypeError, match="must subclass Value"):
        @value
        class Plain:
            peer: int


def test_frozen_as_dataclass_writes_it_for_the_class_and_a_plain_subclass():
    class Plain(Shared):  # not a dataclass: its instances take attributes other than the fields
        pass

    class Plain2(Shared2):
        pass

    for ours, theirs in ((Shared(1), Shared2(1)), (Plain(1), Plain2(1))):
        for name in ("peer", "other"):
            outcomes = []
            for item in (ours, theirs):
                try:
                    setattr(item, name, 5)
                    outcomes.append(("set", getattr(item, name)))
                except dataclasses.FrozenInstanceError as error:
                    outcomes.append(("refused", str(error)))
                try:
                    delattr(item, name)
                    outcomes.append("deleted")
                except dataclasses.FrozenInstanceError as error:
                    outcomes.append(("refused", str(error)))
            assert outcomes[:2] == outcomes[2:], (type(ours), name)
    assert not hasattr(Plain(1), "other") and Shared.__setattr__ is Other.__setattr__  # shared, not compiled


def test_a_dataclass_made_afterwards_compiles_its_own_frozen_methods():
    @dataclass(frozen=True)
    class After:
        peer: int

    assert After.__setattr__ is not Shared.__setattr__
    with pytest.raises(dataclasses.FrozenInstanceError):
        After(1).peer = 2

