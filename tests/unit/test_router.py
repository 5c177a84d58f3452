"""Unit tests of processors.router: rule matching, ordering, custom rules and defaults."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors import router as rt
from processors.config import RouteAction, SwitchboardConfig
from schemas.models import Channel, InboundMessage, MessageType

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def make_msg(content: str = "hello", **fields: Any) -> InboundMessage:
    base: dict[str, Any] = {
        "message_id": "m-1",
        "tenant": "acme",
        "channel": Channel.CHAT,
        "sender": "u1",
        "content": content,
        "created_at": NOW,
    }
    base.update(fields)
    return InboundMessage(**base)


def make_router(rules: list[dict[str, Any]], **routing: Any) -> rt.Router:
    config = SwitchboardConfig.model_validate(
        {
            "personas": {
                "general": {"name": "Gen"},
                "support": {"name": "Alex"},
                "sales": {"name": "Sam"},
            },
            "flows": {"notify": {}, "sms_alert": {"channel": "sms"}},
            "routing": {"default_persona": "general", "rules": rules, **routing},
        }
    )
    return rt.Router(config)


def rule(name: str, match: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, **fields}
    if match is not None:
        out["match"] = match
    out.setdefault("action", {"persona": "support"})
    return out


@pytest.fixture(autouse=True)
def _empty_rule_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rt, "_RULES", {})


# --- keywords and regex ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("I need HELP please", "support"),
        ("help!", "support"),
        ("my order is late", "support"),
        ("helpful article", "general"),
        ("unhelpful", "general"),
        ("reorder", "general"),
    ],
)
def test_keyword_matches_whole_words_case_insensitively(content: str, expected: str) -> None:
    router = make_router([rule("support", {"keywords": ["help", "order"]})])
    assert router.route(make_msg(content)).target == expected


def test_multi_word_keyword_matches_as_a_phrase() -> None:
    router = make_router([rule("support", {"keywords": ["reset password"]})])
    assert router.route(make_msg("please RESET password now")).rule == "support"
    assert router.route(make_msg("reset my password")).rule == "default"


def test_regex_is_searched_in_content() -> None:
    router = make_router([rule("order_ref", {"regex": r"#\d{5}\b"})])
    assert router.route(make_msg("where is #12345 ?")).rule == "order_ref"
    assert router.route(make_msg("where is #1234 ?")).rule == "default"


def test_regex_is_case_sensitive_unless_flagged() -> None:
    router = make_router([rule("r", {"regex": "Refund"}), rule("ri", {"regex": "(?i)invoice"})])
    assert router.route(make_msg("refund me")).rule == "default"
    assert router.route(make_msg("Refund me")).rule == "r"
    assert router.route(make_msg("INVOICE")).rule == "ri"


# --- other conditions and their AND ---------------------------------------------------------


def test_metadata_requires_every_key_value_pair() -> None:
    router = make_router([rule("vip", {"metadata": {"tier": "gold", "lang": "en"}})])
    assert router.route(make_msg(metadata={"tier": "gold", "lang": "en", "x": "y"})).rule == "vip"
    assert router.route(make_msg(metadata={"tier": "gold"})).rule == "default"
    assert router.route(make_msg(metadata={"tier": "silver", "lang": "en"})).rule == "default"


def test_message_types_channels_and_tenants_are_membership_conditions() -> None:
    router = make_router(
        [
            rule("by_type", {"message_types": ["alert"]}, action={"flow": "sms_alert"}),
            rule("by_channel", {"channels": ["whatsapp"]}, action={"persona": "sales"}),
            rule("by_tenant", {"tenants": ["globex"]}),
        ]
    )
    assert router.route(make_msg(message_type=MessageType.ALERT)).rule == "by_type"
    assert router.route(make_msg(channel=Channel.WHATSAPP)).target == "sales"
    assert router.route(make_msg(tenant="globex")).rule == "by_tenant"
    assert router.route(make_msg()).rule == "default"


def test_all_given_conditions_must_hold() -> None:
    match = {"keywords": ["refund"], "channels": ["sms"], "metadata": {"tier": "gold"}}
    router = make_router([rule("gold_sms_refund", match)])
    good = {"channel": Channel.SMS, "metadata": {"tier": "gold"}}
    assert router.route(make_msg("refund", **good)).rule == "gold_sms_refund"
    assert router.route(make_msg("hello", **good)).rule == "default"
    assert router.route(
        make_msg("refund", channel=Channel.CHAT, metadata={"tier": "gold"})
    ).rule == ("default")
    assert router.route(make_msg("refund", channel=Channel.SMS)).rule == "default"


# --- ordering -------------------------------------------------------------------------------


def test_rule_with_higher_priority_wins_regardless_of_file_order() -> None:
    router = make_router(
        [
            rule("low", {"keywords": ["buy"]}, priority=1, action={"persona": "support"}),
            rule("high", {"keywords": ["buy"]}, priority=10, action={"persona": "sales"}),
        ]
    )
    decision = router.route(make_msg("buy now"))
    assert (decision.rule, decision.target) == ("high", "sales")
    assert router.rule_names == ["high", "low"]


def test_rules_with_equal_priority_keep_file_order() -> None:
    router = make_router(
        [
            rule("b_first", {"keywords": ["x"]}, priority=5, action={"persona": "sales"}),
            rule("a_second", {"keywords": ["x"]}, priority=5),
            rule("c_top", {"keywords": ["nomatch"]}, priority=9),
        ]
    )
    assert router.rule_names == ["c_top", "b_first", "a_second"]
    assert router.route(make_msg("x")).rule == "b_first"


# --- decisions ------------------------------------------------------------------------------


def test_decision_carries_kind_target_rule_and_override_flag() -> None:
    router = make_router(
        [
            rule("p", {"keywords": ["p"]}, override_continuity=True),
            rule("f", {"keywords": ["f"]}, action={"flow": "notify"}),
        ]
    )
    assert router.route(make_msg("p")) == rt.RouteDecision("persona", "support", "p", True)
    assert router.route(make_msg("f")) == rt.RouteDecision("flow", "notify", "f", False)


def test_drop_action_gives_drop_decision_with_reason() -> None:
    router = make_router([rule("spam", {"keywords": ["casino"]}, action={"drop": "spam keyword"})])
    assert router.route(make_msg("best casino")) == rt.RouteDecision(
        "drop", "spam keyword", "spam", False
    )


# --- custom rules ---------------------------------------------------------------------------


def test_custom_rule_action_replaces_rule_action() -> None:
    @rt.register_rule("urgent")
    def urgent(msg: InboundMessage) -> RouteAction | None:
        return RouteAction.model_validate({"persona": "sales"}) if "urgent" in msg.content else None

    router = make_router([rule("urgency", custom="urgent", action={"persona": "support"})])
    assert router.route(make_msg("urgent: call me")) == rt.RouteDecision(
        "persona", "sales", "urgency"
    )


def test_custom_rule_returning_none_falls_through_to_next_rule() -> None:
    calls: list[str] = []

    @rt.register_rule("never")
    def never(msg: InboundMessage) -> RouteAction | None:
        calls.append(msg.content)
        return None

    router = make_router(
        [
            rule("custom", custom="never", priority=9),
            rule("kw", {"keywords": ["hi"]}, action={"persona": "sales"}),
        ]
    )
    assert router.route(make_msg("hi")).rule == "kw"
    assert calls == ["hi"]


def test_custom_rule_is_only_called_when_match_conditions_hold() -> None:
    calls: list[str] = []

    @rt.register_rule("spy")
    def spy(msg: InboundMessage) -> RouteAction | None:
        calls.append(msg.content)
        return RouteAction.model_validate({"flow": "notify"})

    router = make_router([rule("guarded", {"channels": ["sms"]}, custom="spy")])
    assert router.route(make_msg("chat msg")).rule == "default"
    assert calls == []
    assert router.route(make_msg("sms msg", channel=Channel.SMS)).target == "notify"
    assert calls == ["sms msg"]


def test_custom_rule_choosing_unknown_persona_is_dropped_with_reason() -> None:
    rt.register_rule("bad")(lambda msg: RouteAction.model_validate({"persona": "nobody"}))
    decision = make_router([rule("bad_rule", custom="bad")]).route(make_msg())
    assert decision.kind == "drop"
    assert decision.target == "rule 'bad_rule' chose unknown persona 'nobody'"


def test_router_rejects_unregistered_custom_rule_naming_it() -> None:
    rt.register_rule("known")(lambda msg: None)
    with pytest.raises(
        ValueError, match=r"rule 'r1': custom rule 'ghost' is not registered"
    ) as info:
        make_router([rule("r1", custom="ghost")])
    assert "['known']" in str(info.value)


def test_registered_rules_are_listed_sorted_and_names_are_unique() -> None:
    rt.register_rule("zeta")(lambda msg: None)
    rt.register_rule("alpha")(lambda msg: None)
    assert rt.registered_rules() == ["alpha", "zeta"]
    with pytest.raises(ValueError, match="'zeta' is already registered"):
        rt.register_rule("zeta")(lambda msg: None)


# --- routing slip and defaults --------------------------------------------------------------


def test_routing_slip_first_known_entry_wins_over_rules() -> None:
    router = make_router([rule("kw", {"keywords": ["help"]}, priority=100)])
    msg = make_msg("help", routing_slip=["unknown", "sales", "support"])
    assert router.route(msg) == rt.RouteDecision("persona", "sales", "routing_slip", True)


def test_routing_slip_may_name_a_flow() -> None:
    msg = make_msg(routing_slip=["sms_alert"], message_type=MessageType.ALERT)
    assert make_router([]).route(msg) == rt.RouteDecision("flow", "sms_alert", "routing_slip", True)


def test_routing_slip_with_only_unknown_entries_is_ignored() -> None:
    assert make_router([]).route(make_msg(routing_slip=["x", "y"])).rule == "default"


def test_unmatched_chat_goes_to_default_persona() -> None:
    assert make_router([]).route(make_msg()) == rt.RouteDecision("persona", "general", "default")


@pytest.mark.parametrize(
    "message_type",
    [MessageType.OTP, MessageType.ALERT, MessageType.NOTIFICATION, MessageType.REMINDER],
)
def test_unmatched_non_chat_goes_to_notification_flow(message_type: MessageType) -> None:
    decision = make_router([]).route(make_msg(message_type=message_type))
    assert decision == rt.RouteDecision("flow", "notify", "notification_default")


def test_unmatched_non_chat_goes_to_default_persona_without_notification_flow() -> None:
    router = make_router([], notification_flow=None)
    decision = router.route(make_msg(message_type=MessageType.ALERT))
    assert decision == rt.RouteDecision("persona", "general", "default")


_KW_ROUTER = make_router([rule("kw", {"keywords": ["refund"]})])
_SEPARATORS = st.text(alphabet=" .,!?\n-:;()'\"", max_size=5)


@given(
    st.lists(st.booleans(), min_size=6, max_size=6).map(
        lambda upper: "".join(c.upper() if u else c for c, u in zip("refund", upper, strict=True))
    ),
    _SEPARATORS,
    _SEPARATORS,
)
def test_keyword_in_any_case_between_separators_matches(word: str, before: str, after: str) -> None:
    assert _KW_ROUTER.route(make_msg(f"{before}{word}{after}")).rule == "kw"


@given(st.text(alphabet="abcxyz0123_", min_size=1, max_size=3), st.booleans())
def test_keyword_glued_to_word_characters_does_not_match(glue: str, glue_before: bool) -> None:
    content = f"{glue}refund" if glue_before else f"refund{glue}"
    assert _KW_ROUTER.route(make_msg(content)).rule == "default"
