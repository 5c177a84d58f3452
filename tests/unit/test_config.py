"""Unit tests of processors.config validation: every error names the culprit and the expectation."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from processors.config import SwitchboardConfig
from schemas.models import Channel

BASE: dict[str, Any] = {
    "knowledge_bases": {"faq": {"sources": ["chatterbot:english/greetings"]}},
    "engines": {"local": {"kind": "local"}, "gpt": {"kind": "openai", "model": "gpt-4o-mini"}},
    "personas": {
        "general": {"name": "Gen", "knowledge_base": "faq"},
        "support": {"name": "Alex", "engines": ["gpt", "local"]},
    },
    "flows": {"notify": {}},
    "routing": {
        "default_persona": "general",
        "rules": [
            {"name": "help", "match": {"keywords": ["help"]}, "action": {"persona": "support"}},
        ],
    },
}


def config_with(**changes: Any) -> dict[str, Any]:
    """Return a deep copy of BASE with nested keys replaced (``routing__default_persona=...``)."""
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return data


def only_error(data: dict[str, Any]) -> tuple[str, str]:
    """Validate ``data``, expect exactly one error, return its dotted location and message."""
    with pytest.raises(ValidationError) as info:
        SwitchboardConfig.model_validate(data)
    errors = info.value.errors()
    assert len(errors) == 1, errors
    return ".".join(str(part) for part in errors[0]["loc"]), errors[0]["msg"]


def test_valid_config_loads_with_defaults() -> None:
    config = SwitchboardConfig.model_validate(BASE)
    assert config.routing.rules[0].action is not None
    assert config.routing.rules[0].action.persona == "support"
    assert config.preprocess.max_content_chars == 4000
    assert config.channels[Channel.CHAT].connector == "outbox"
    assert config.routing.notification_flow == "notify"


def test_rule_naming_unknown_persona_names_rule_persona_and_known_personas() -> None:
    rules = [{"name": "billing", "match": {"keywords": ["bill"]}, "action": {"persona": "ghost"}}]
    _, msg = only_error(config_with(routing__rules=rules))
    assert "routing rule 'billing': unknown persona 'ghost'" in msg
    assert "(known: ['general', 'support'])" in msg


def test_rule_naming_unknown_flow_names_rule_flow_and_known_flows() -> None:
    rules = [{"name": "alerts", "match": {"message_types": ["alert"]}, "action": {"flow": "pager"}}]
    _, msg = only_error(config_with(routing__rules=rules))
    assert "routing rule 'alerts': unknown flow 'pager' (known: ['notify'])" in msg


def test_invalid_regex_names_the_expression_and_the_field() -> None:
    rules = [{"name": "r", "match": {"regex": "(unclosed"}, "action": {"persona": "support"}}]
    loc, msg = only_error(config_with(routing__rules=rules))
    assert loc == "routing.rules.0.match.regex"
    assert "invalid regular expression '(unclosed'" in msg
    assert "missing )" in msg


def test_action_with_two_targets_says_exactly_one_is_expected() -> None:
    rules = [
        {
            "name": "r",
            "match": {"keywords": ["x"]},
            "action": {"persona": "support", "flow": "notify"},
        }
    ]
    loc, msg = only_error(config_with(routing__rules=rules))
    assert loc == "routing.rules.0.action"
    assert "exactly one of persona, flow or drop must be set" in msg


def test_action_with_no_target_says_exactly_one_is_expected() -> None:
    rules = [{"name": "r", "match": {"keywords": ["x"]}, "action": {}}]
    loc, msg = only_error(config_with(routing__rules=rules))
    assert loc == "routing.rules.0.action"
    assert "exactly one of persona, flow or drop must be set" in msg


def test_rule_without_match_or_custom_names_the_rule() -> None:
    _, msg = only_error(config_with(routing__rules=[{"name": "empty", "action": {"drop": "x"}}]))
    assert "rule 'empty' needs 'match' or 'custom'" in msg


def test_rule_without_action_or_custom_names_the_rule() -> None:
    _, msg = only_error(
        config_with(routing__rules=[{"name": "noact", "match": {"keywords": ["x"]}}])
    )
    assert "rule 'noact' needs an 'action'" in msg


def test_custom_rule_may_omit_action() -> None:
    rules = [{"name": "c", "custom": "urgency_check"}]
    config = SwitchboardConfig.model_validate(config_with(routing__rules=rules))
    assert config.routing.rules[0].action is None


def test_unknown_knowledge_base_names_persona_base_and_known_bases() -> None:
    personas = {"general": {"name": "Gen", "knowledge_base": "wiki"}}
    _, msg = only_error(config_with(personas=personas, routing__rules=[]))
    assert "persona 'general': unknown knowledge_base 'wiki' (known: ['faq'])" in msg


def test_unknown_engine_names_persona_engine_and_known_engines() -> None:
    personas = {"general": {"name": "Gen", "engines": ["local", "claude"]}}
    _, msg = only_error(config_with(personas=personas, routing__rules=[]))
    assert "persona 'general': unknown engine 'claude' (known: ['gpt', 'local'])" in msg


def test_missing_default_persona_names_it_and_known_personas() -> None:
    _, msg = only_error(config_with(routing__default_persona="concierge"))
    assert "routing.default_persona 'concierge' is not a persona" in msg
    assert "(known: ['general', 'support'])" in msg


def test_routing_without_default_persona_field_is_reported_as_missing() -> None:
    data = config_with()
    del data["routing"]["default_persona"]
    loc, msg = only_error(data)
    assert loc == "routing.default_persona"
    assert msg == "Field required"


def test_unknown_notification_flow_names_it_and_known_flows() -> None:
    _, msg = only_error(config_with(routing__notification_flow="pager"))
    assert "routing.notification_flow 'pager' is not a flow (known: ['notify'])" in msg


def test_misspelt_field_is_rejected_with_its_location() -> None:
    loc, msg = only_error(config_with(preprocess={"max_content_char": 10}))
    assert loc == "preprocess.max_content_char"
    assert msg == "Extra inputs are not permitted"


def test_empty_personas_is_rejected() -> None:
    loc, msg = only_error(config_with(personas={}))
    assert loc == "personas"
    assert "at least 1 item" in msg


def test_ended_retention_defaults_to_a_day_and_must_be_positive() -> None:
    assert SwitchboardConfig.model_validate(BASE).conversation.ended_retention_s == 86400.0
    loc, msg = only_error(config_with(conversation={"ended_retention_s": 0}))
    assert loc == "conversation.ended_retention_s"
    assert msg == "Input should be greater than 0"


def test_max_llm_attempts_must_leave_room_for_the_answering_attempt() -> None:
    assert SwitchboardConfig.model_validate(BASE).conversation.max_llm_attempts == 3
    loc, msg = only_error(
        config_with(conversation={"max_llm_attempts": 2}, llm={"answer_from_attempt": 2})
    )
    assert loc == ""
    assert "conversation.max_llm_attempts (2) must be above llm.answer_from_attempt (2)" in msg
    ok = config_with(conversation={"max_llm_attempts": 3}, llm={"answer_from_attempt": 2})
    assert SwitchboardConfig.model_validate(ok).conversation.max_llm_attempts == 3
