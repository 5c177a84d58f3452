"""Unit tests of processors.preprocess: normalisation, limits, expiry and content filters."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors import preprocess as pp
from processors.config import PreprocessConfig
from schemas.models import Channel, InboundMessage

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def make_msg(content: str = "hello", **fields: Any) -> InboundMessage:
    base: dict[str, Any] = {
        "message_id": "m-1",
        "tenant": "acme",
        "channel": Channel.SMS,
        "sender": "+441234",
        "content": content,
        "created_at": NOW,
    }
    base.update(fields)
    return InboundMessage(**base)


def cfg(**fields: Any) -> PreprocessConfig:
    return PreprocessConfig.model_validate(fields)


@pytest.fixture(autouse=True)
def _empty_filter_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pp, "_CONTENT_FILTERS", {})


# --- normalize_text -------------------------------------------------------------------------


def test_normalize_composes_decomposed_characters_to_nfc() -> None:
    decomposed = "Cafe\u0301 n\u0303"
    assert pp.normalize_text(decomposed) == "Caf\u00e9 \u00f1"


def test_normalize_strips_c0_and_c1_controls_but_keeps_newline_and_tab_as_text() -> None:
    assert pp.normalize_text("a\x00b\x07c\x1bd\x7fe\x85f\x9fg") == "abcdefg"
    assert pp.normalize_text("line1\nline2") == "line1\nline2"


def test_normalize_composes_across_a_removed_control_character() -> None:
    assert pp.normalize_text("e\x00\u0301") == "\u00e9"


def test_normalize_converts_crlf_and_cr_to_newline() -> None:
    assert pp.normalize_text("a\r\nb\rc") == "a\nb\nc"


def test_normalize_collapses_spaces_and_tabs_to_one_space() -> None:
    assert pp.normalize_text("a  \t b\t\tc") == "a b c"


def test_normalize_strips_trailing_spaces_of_each_line() -> None:
    assert pp.normalize_text("a   \nb\t\nc") == "a\nb\nc"


def test_normalize_collapses_three_or_more_newlines_to_two() -> None:
    assert pp.normalize_text("a\n\n\n\n\nb\n\nc") == "a\n\nb\n\nc"


def test_normalize_treats_whitespace_only_lines_as_blank() -> None:
    assert pp.normalize_text("a\n  \n\t\n \nb") == "a\n\nb"


def test_normalize_strips_the_whole_text() -> None:
    assert pp.normalize_text("\n\n  hi there \n\n") == "hi there"


@given(st.text())
def test_normalize_is_idempotent(text: str) -> None:
    once = pp.normalize_text(text)
    assert pp.normalize_text(once) == once


_TRICKY = st.sampled_from(
    list("ae \t\n\r\x00\x07\x85\u0301\u0300\u0327\u00a0\u3000\u2028\u1100\u1161\u11a8\u212b")
)


@given(st.text(alphabet=_TRICKY))
def test_normalize_is_idempotent_on_combining_marks_controls_and_unicode_spaces(text: str) -> None:
    once = pp.normalize_text(text)
    assert pp.normalize_text(once) == once


@given(st.text())
def test_normalize_output_is_nfc_without_forbidden_characters(text: str) -> None:
    out = pp.normalize_text(text)
    assert unicodedata.is_normalized("NFC", out)
    assert "\r" not in out
    assert "  " not in out
    assert "\t" not in out
    assert "\n\n\n" not in out
    assert all(unicodedata.category(ch) != "Cc" or ch == "\n" for ch in out)
    assert out == out.strip()


# --- ids and keys ---------------------------------------------------------------------------


def test_conversation_id_is_taken_from_message_when_set() -> None:
    assert pp.conversation_id_for(make_msg(conversation_id="c-42")) == "c-42"


def test_conversation_id_defaults_to_tenant_channel_sender() -> None:
    assert pp.conversation_id_for(make_msg()) == "acme:sms:+441234"
    assert pp.conversation_id_for(make_msg(conversation_id="")) == "acme:sms:+441234"


def test_dedup_key_names_tenant_and_message_id() -> None:
    assert pp.dedup_key(make_msg(message_id="abc")) == "dedup:acme:abc"


# --- content filter registry ----------------------------------------------------------------


def test_registered_filter_is_found_by_name() -> None:
    @pp.register_content_filter("no_links")
    def no_links(msg: InboundMessage) -> str | None:
        return "contains a link" if "http" in msg.content else None

    assert pp.content_filter("no_links") is no_links
    assert pp.registered_content_filters() == ["no_links"]


def test_unknown_filter_lookup_lists_known_names() -> None:
    pp.register_content_filter("alpha")(lambda msg: None)
    with pytest.raises(
        KeyError, match=r"unknown content filter 'beta' \(registered: \['alpha'\]\)"
    ):
        pp.content_filter("beta")


def test_registering_a_second_function_under_a_taken_name_fails() -> None:
    pp.register_content_filter("dup")(lambda msg: None)
    with pytest.raises(ValueError, match="'dup' is already registered"):
        pp.register_content_filter("dup")(lambda msg: "x")


def test_builtin_filter_name_is_reserved() -> None:
    with pytest.raises(ValueError, match="'blocked_terms' is reserved"):
        pp.register_content_filter("blocked_terms")(lambda msg: None)


def test_check_content_filters_names_the_unknown_filter() -> None:
    pp.register_content_filter("ok")(lambda msg: None)
    pp.check_content_filters(cfg(content_filters=["ok"]))
    with pytest.raises(KeyError, match="'missing'"):
        pp.check_content_filters(cfg(content_filters=["ok", "missing"]))


def test_blocked_term_matches_whole_words_case_insensitively() -> None:
    assert pp.find_blocked_term("Buy CRYPTO now", ["crypto"]) == "crypto"
    assert pp.find_blocked_term("cryptography is fun", ["crypto"]) is None
    assert pp.find_blocked_term("send free money!", ["free money"]) == "free money"
    assert pp.find_blocked_term("anything", []) is None
    assert pp.find_blocked_term("anything", ["  "]) is None


# --- preprocess -----------------------------------------------------------------------------


def test_accepted_message_carries_normalised_content_and_conversation_id() -> None:
    msg = make_msg("  Cafe\u0301\r\n\r\n\r\n\r\nok  ")
    result = pp.preprocess(msg, cfg(), NOW)
    assert isinstance(result, pp.Accepted)
    assert result.message.content == "Caf\u00e9\n\nok"
    assert result.message.message_id == msg.message_id
    assert result.conversation_id == "acme:sms:+441234"
    assert msg.content == "  Cafe\u0301\r\n\r\n\r\n\r\nok  "


def test_too_long_content_is_rejected_with_sizes_and_setting() -> None:
    result = pp.preprocess(make_msg("x" * 5000), cfg(max_content_chars=4000), NOW)
    assert result == pp.Rejected(
        "ingest.preprocess",
        "content is 5000 characters, limit is 4000 (preprocess.max_content_chars)",
        "ContentTooLong",
    )


def test_length_limit_is_counted_after_normalisation() -> None:
    padded = "   " + "a  " * 10 + "\n\n\n\n"  # 37 characters raw, "a a ... a" is 19 after
    assert isinstance(pp.preprocess(make_msg(padded), cfg(max_content_chars=19), NOW), pp.Accepted)
    rejected = pp.preprocess(make_msg(padded), cfg(max_content_chars=18), NOW)
    assert isinstance(rejected, pp.Rejected)
    assert rejected.reason.startswith("content is 19 characters, limit is 18")


def test_content_empty_after_normalisation_is_rejected() -> None:
    result = pp.preprocess(make_msg(" \x00\t\r\n \x07 "), cfg(), NOW)
    assert result == pp.Rejected(
        "ingest.preprocess", "content is empty after normalisation", "EmptyContent"
    )


def test_content_shorter_than_minimum_is_rejected() -> None:
    result = pp.preprocess(make_msg("hi"), cfg(min_content_chars=3), NOW)
    assert isinstance(result, pp.Rejected)
    assert result.reason == "content is 2 characters, minimum is 3 (preprocess.min_content_chars)"


def test_empty_content_is_accepted_when_minimum_is_zero() -> None:
    result = pp.preprocess(make_msg("   "), cfg(min_content_chars=0), NOW)
    assert isinstance(result, pp.Accepted)
    assert result.message.content == ""


def test_expired_message_is_rejected_with_ttl_and_deadline() -> None:
    msg = make_msg(ttl_ms=1000, created_at=NOW - timedelta(seconds=5))
    result = pp.preprocess(msg, cfg(), NOW)
    assert isinstance(result, pp.Rejected)
    assert result.error_type == "MessageExpired"
    assert result.reason == (
        "message expired: ttl_ms=1000 elapsed at 2024-05-01T11:59:56+00:00 "
        "(now 2024-05-01T12:00:00+00:00)"
    )


def test_message_within_ttl_is_accepted_and_expires_exactly_at_deadline() -> None:
    msg = make_msg(ttl_ms=1000, created_at=NOW)
    assert isinstance(pp.preprocess(msg, cfg(), NOW + timedelta(milliseconds=999)), pp.Accepted)
    assert isinstance(pp.preprocess(msg, cfg(), NOW + timedelta(milliseconds=1000)), pp.Rejected)


def test_ttl_of_a_scheduled_message_counts_from_scheduled_for() -> None:
    msg = make_msg(ttl_ms=60_000, created_at=NOW - timedelta(hours=1), scheduled_for=NOW)
    assert isinstance(pp.preprocess(msg, cfg(), NOW + timedelta(seconds=30)), pp.Accepted)


def test_blocked_term_rejects_with_filter_name_and_configured_term() -> None:
    result = pp.preprocess(make_msg("Win a PRIZE today"), cfg(blocked_terms=["prize"]), NOW)
    assert result == pp.Rejected(
        "ingest.preprocess",
        "blocked by content filter 'blocked_terms': term 'prize'",
        "ContentBlocked",
    )


def test_blocked_term_inside_a_longer_word_passes() -> None:
    result = pp.preprocess(make_msg("enterprize"), cfg(blocked_terms=["prize"]), NOW)
    assert isinstance(result, pp.Accepted)


def test_registered_filter_rejection_names_the_filter_and_its_reason() -> None:
    seen: list[str] = []

    @pp.register_content_filter("no_links")
    def no_links(msg: InboundMessage) -> str | None:
        seen.append(msg.content)
        return "contains a link" if "http" in msg.content else None

    config = cfg(content_filters=["no_links"])
    result = pp.preprocess(make_msg("see  http://x"), config, NOW)
    assert result == pp.Rejected(
        "ingest.preprocess",
        "blocked by content filter 'no_links': contains a link",
        "ContentBlocked",
    )
    assert seen == ["see http://x"]  # the hook sees normalised content
    assert isinstance(pp.preprocess(make_msg("no link"), config, NOW), pp.Accepted)


def test_filters_run_in_configured_order_and_first_rejection_wins() -> None:
    pp.register_content_filter("first")(lambda msg: "first says no")
    pp.register_content_filter("second")(lambda msg: "second says no")
    result = pp.preprocess(make_msg(), cfg(content_filters=["second", "first"]), NOW)
    assert isinstance(result, pp.Rejected)
    assert result.reason == "blocked by content filter 'second': second says no"


def test_unregistered_filter_in_config_raises_key_error() -> None:
    with pytest.raises(KeyError, match="'ghost'"):
        pp.preprocess(make_msg(), cfg(content_filters=["ghost"]), NOW)


# --- field limits and the tenant ------------------------------------------------------------


def test_default_field_limits() -> None:
    defaults = cfg()
    assert defaults.max_tenant_chars == 64
    assert defaults.max_message_id_chars == 256
    assert defaults.max_conversation_id_chars == 256
    assert defaults.max_sender_chars == 320
    assert defaults.max_recipients == 100
    assert defaults.max_recipient_chars == 320
    assert defaults.max_subject_chars == 998
    assert defaults.max_metadata_bytes == 16384


@pytest.mark.parametrize(
    ("field", "limit", "setting", "error_type"),
    [
        ("message_id", 256, "max_message_id_chars", "MessageIdTooLong"),
        ("in_response_to", 256, "max_message_id_chars", "MessageIdTooLong"),
        ("conversation_id", 256, "max_conversation_id_chars", "ConversationIdTooLong"),
        ("sender", 320, "max_sender_chars", "SenderTooLong"),
        ("subject", 998, "max_subject_chars", "SubjectTooLong"),
    ],
)
def test_each_field_is_accepted_at_its_default_limit_and_rejected_one_over(
    field: str, limit: int, setting: str, error_type: str
) -> None:
    at_limit = pp.preprocess(make_msg(**{field: "é" * limit}), cfg(), NOW)
    assert isinstance(at_limit, pp.Accepted), at_limit
    over = pp.preprocess(make_msg(**{field: "é" * (limit + 1)}), cfg(), NOW)
    assert over == pp.Rejected(
        "ingest.preprocess",
        f"{field} is {limit + 1} characters, limit is {limit} (preprocess.{setting})",
        error_type,
    )


def test_field_limits_are_configurable() -> None:
    assert isinstance(
        pp.preprocess(make_msg(sender="+4412"), cfg(max_sender_chars=5), NOW), pp.Accepted
    )
    rejected = pp.preprocess(make_msg(sender="+44123"), cfg(max_sender_chars=5), NOW)
    assert isinstance(rejected, pp.Rejected)
    assert rejected.reason == "sender is 6 characters, limit is 5 (preprocess.max_sender_chars)"


def test_recipients_are_limited_in_number_and_each_in_length() -> None:
    hundred = [f"user{n}@example.com" for n in range(100)]
    assert isinstance(pp.preprocess(make_msg(recipients=hundred), cfg(), NOW), pp.Accepted)
    too_many = pp.preprocess(make_msg(recipients=[*hundred, "one@more.com"]), cfg(), NOW)
    assert too_many == pp.Rejected(
        "ingest.preprocess",
        "101 recipients, limit is 100 (preprocess.max_recipients)",
        "TooManyRecipients",
    )
    longest = "a" * 308 + "@example.com"  # 320 characters
    ok = pp.preprocess(make_msg(recipients=["x@example.com", longest]), cfg(), NOW)
    assert isinstance(ok, pp.Accepted)
    too_long = pp.preprocess(make_msg(recipients=["x@example.com", "a" + longest]), cfg(), NOW)
    assert too_long == pp.Rejected(
        "ingest.preprocess",
        "recipients[1] is 321 characters, limit is 320 (preprocess.max_recipient_chars)",
        "RecipientTooLong",
    )


def test_metadata_is_limited_in_utf8_bytes_of_keys_and_values() -> None:
    # 2 + 6 + 2 + 3 * 5458 = 16384 bytes: "€" is 3 bytes in UTF-8 (5,468 characters)
    at_limit = {"k1": "value1", "k2": "€" * 5458}
    assert sum(len(k.encode()) + len(v.encode()) for k, v in at_limit.items()) == 16384
    assert isinstance(pp.preprocess(make_msg(metadata=at_limit), cfg(), NOW), pp.Accepted)
    over = {**at_limit, "k2": at_limit["k2"] + "z"}
    assert pp.preprocess(make_msg(metadata=over), cfg(), NOW) == pp.Rejected(
        "ingest.preprocess",
        "metadata is 16385 bytes (UTF-8 keys and values of 2 entries), limit is 16384 "
        "(preprocess.max_metadata_bytes)",
        "MetadataTooLarge",
    )
    emoji = {"k": "\U0001f600" * 4095 + "xyz"}  # 1 + 4 * 4095 + 3 = 16384 bytes
    assert isinstance(pp.preprocess(make_msg(metadata=emoji), cfg(), NOW), pp.Accepted)
    emoji_over = pp.preprocess(make_msg(metadata={"k": emoji["k"] + "!"}), cfg(), NOW)
    assert isinstance(emoji_over, pp.Rejected)
    assert emoji_over.reason.startswith("metadata is 16385 bytes")
    big_key = {"k" * 20: "v"}
    rejected = pp.preprocess(make_msg(metadata=big_key), cfg(max_metadata_bytes=20), NOW)
    assert isinstance(rejected, pp.Rejected)
    assert rejected.reason.startswith("metadata is 21 bytes")


def test_the_reviewers_control_character_metadata_is_rejected_at_ingest() -> None:
    msg = make_msg("hi", metadata={"x": "\x01" * 1_500_000})
    result = pp.preprocess(msg, cfg(), NOW)
    assert isinstance(result, pp.Rejected)
    assert result.error_type == "MetadataTooLarge"
    assert result.reason.startswith("metadata is 1500001 bytes")


@pytest.mark.parametrize("tenant", ["acme", "acme-eu_1.prod", "t", "a" * 64, "Société Générale"])
def test_ordinary_tenants_are_accepted(tenant: str) -> None:
    assert isinstance(pp.preprocess(make_msg(tenant=tenant), cfg(), NOW), pp.Accepted)


@pytest.mark.parametrize(
    ("tenant", "reason"),
    [
        ("", "tenant '' is empty"),
        (
            "a" * 65,
            f"tenant {'a' * 64!r}... is 65 characters, limit is 64 (preprocess.max_tenant_chars)",
        ),
        (
            "acme/eu",
            "tenant 'acme/eu' contains '/', which separates tenant and conversation id in "
            "conversation keys",
        ),
        (
            "acme:eu",
            "tenant 'acme:eu' contains ':', which separates tenant and message id in dedup keys",
        ),
        ("ac\x00me", "tenant 'ac\\x00me' contains a control character"),
        ("acme\n", "tenant 'acme\\n' contains a control character"),
    ],
)
def test_invalid_tenants_are_rejected_with_the_rule(tenant: str, reason: str) -> None:
    result = pp.preprocess(make_msg(tenant=tenant), cfg(), NOW)
    assert result == pp.Rejected("ingest.preprocess", reason, "InvalidTenant")


def test_tenant_limit_is_configurable() -> None:
    assert isinstance(
        pp.preprocess(make_msg(tenant="abc"), cfg(max_tenant_chars=3), NOW), pp.Accepted
    )
    result = pp.preprocess(make_msg(tenant="abcd"), cfg(max_tenant_chars=3), NOW)
    assert isinstance(result, pp.Rejected)
    assert result.error_type == "InvalidTenant"


def test_two_tenants_can_no_longer_share_a_conversation_key() -> None:
    # tenant "acme" + conversation "eu/42" and tenant "acme/eu" + conversation "42" would both
    # be "acme/eu/42": one state, one history sent to the LLM for both tenants.
    first = pp.preprocess(make_msg(tenant="acme", conversation_id="eu/42"), cfg(), NOW)
    assert isinstance(first, pp.Accepted)
    assert pp.conversation_key("acme", first.conversation_id) == "acme/eu/42"
    second = pp.preprocess(make_msg(tenant="acme/eu", conversation_id="42"), cfg(), NOW)
    assert isinstance(second, pp.Rejected)
    assert second.error_type == "InvalidTenant"
    # nor a dedup key: "dedup:acme:eu:1" for tenant "acme", message "eu:1"
    third = pp.preprocess(make_msg(tenant="acme:eu", message_id="1"), cfg(), NOW)
    assert isinstance(third, pp.Rejected)
    assert third.error_type == "InvalidTenant"


def test_tenant_and_field_limits_are_checked_before_expiry_and_content() -> None:
    expired = {"ttl_ms": 1, "created_at": NOW - timedelta(seconds=5)}
    result = pp.preprocess(
        make_msg("x" * 5000, tenant="a/b", sender="s" * 400, **expired), cfg(), NOW
    )
    assert isinstance(result, pp.Rejected)
    assert result.error_type == "InvalidTenant"
    result = pp.preprocess(make_msg("x" * 5000, sender="s" * 400, **expired), cfg(), NOW)
    assert isinstance(result, pp.Rejected)
    assert result.error_type == "SenderTooLong"


@pytest.mark.parametrize("message_id", ["", " ", "\t\n"])
def test_a_blank_message_id_is_rejected(message_id: str) -> None:
    # It is the idempotency key (dedup_key): every blank id was "dedup:acme:", so every message
    # after the first with a blank id was dropped as a duplicate.
    result = pp.preprocess(make_msg(message_id=message_id), cfg(), NOW)
    assert isinstance(result, pp.Rejected)
    assert result.error_type == "MissingMessageId"
    assert f"message_id {message_id!r} is blank" in result.reason
    assert isinstance(pp.preprocess(make_msg(message_id=" m-1 "), cfg(), NOW), pp.Accepted)
