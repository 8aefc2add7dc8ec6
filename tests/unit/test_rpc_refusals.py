"""What a handler's failure becomes on the wire: a refusal raised inside a nursery answers as itself."""

from overlay.wire.rpc import Conflict, RequestError, Unreachable, _refusal_in


def test_a_group_of_refusals_answers_with_its_first_and_anything_else_stays_a_crash():
    conflict = Conflict("the record changed")
    assert _refusal_in(ExceptionGroup("nursery", [conflict, RequestError("other")])) is conflict
    nested = Unreachable("node3: connection refused")
    assert _refusal_in(ExceptionGroup("outer", [ExceptionGroup("inner", [nested])])) is nested
    mixed = ExceptionGroup("nursery", [conflict, KeyError("bug")])
    assert _refusal_in(mixed) is mixed  # a bug beside it: reported as the crash it is
    plain = ValueError("bug")
    assert _refusal_in(plain) is plain and _refusal_in(conflict) is conflict
