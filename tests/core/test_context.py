"""bridge.core.context: the typed record of what the broker decided about a session."""

from __future__ import annotations

import pytest

from bridge.core.context import ConnectionContext
from bridge.core.hooks import Admitted


def test_a_new_context_is_not_admitted_and_owns_nothing() -> None:
    context = ConnectionContext()
    assert (context.user, context.claims, context.policy, context.zone) == (None, None, None, None)
    assert (context.admitted, context.disconnected_at) == (False, None)


@pytest.mark.parametrize(
    "admitted",
    [Admitted("alice"), Admitted("bob", claims={"sub": "bob"}, policy=("acl",), zone="Africa/Cairo")],
)
def test_admit_takes_the_decision_and_a_new_token_replaces_the_old(admitted: Admitted) -> None:
    context = ConnectionContext(
        user="old", claims="old", policy="old", zone="Europe/Paris", disconnected_at=5.0
    )
    context.admit(admitted)
    assert (context.user, context.claims, context.policy, context.zone) == (
        admitted.user,
        admitted.claims,
        admitted.policy,
        admitted.zone,
    )
    assert context.admitted is True
    assert context.disconnected_at == 5.0  # the broker's, not the token's


def test_contexts_are_compared_by_identity() -> None:
    assert ConnectionContext() != ConnectionContext()
