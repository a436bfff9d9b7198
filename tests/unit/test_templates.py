"""Renderer: language selection, status prefixes, budgets, SMS encoding, cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from defusedxml import ElementTree

from streams.records import Alert, Area, Info
from templates.render import (
    PUSH_BODY_MAX,
    SUBJECT_MAX,
    Renderer,
    is_gsm7,
    select_info,
    sms_segments,
)

CAP_NS = {"cap": "urn:oasis:names:tc:emergency:cap:1.2"}
AMBER = "cap12/oasiscap__spec12_A4_amber_multilingual.xml"


def load_cap(path: Path) -> Alert:
    """A minimal CAP 1.2 -> Alert mapping, enough for rendering tests."""
    root = ElementTree.parse(path).getroot()

    def text(el: object, tag: str, default: str = "") -> str:
        found = el.find(f"cap:{tag}", CAP_NS)  # type: ignore[attr-defined]
        return found.text.strip() if found is not None and found.text else default

    infos = []
    for el in root.findall("cap:info", CAP_NS):
        infos.append(
            Info(
                language=text(el, "language", "en-US"),
                event=text(el, "event"),
                urgency=text(el, "urgency"),
                severity=text(el, "severity"),
                certainty=text(el, "certainty"),
                sender_name=text(el, "senderName"),
                headline=text(el, "headline"),
                description=text(el, "description"),
                instruction=text(el, "instruction"),
                web=text(el, "web"),
                expires=text(el, "expires") or None,
                areas=[Area(desc=text(a, "areaDesc")) for a in el.findall("cap:area", CAP_NS)],
            )
        )
    return Alert(
        identifier=text(root, "identifier"),
        sender=text(root, "sender"),
        sent=text(root, "sent"),
        status=text(root, "status"),
        msg_type=text(root, "msgType"),
        scope=text(root, "scope"),
        infos=infos,
    )


@pytest.fixture
def amber(data_dir: Path) -> Alert:
    return load_cap(data_dir / "cap" / AMBER)


def with_status(alert: Alert, status: str, msg_type: str = "Alert") -> Alert:
    return Alert(
        identifier=alert.identifier,
        sender=alert.sender,
        sent=alert.sent,
        status=status,
        msg_type=msg_type,
        scope=alert.scope,
        infos=alert.infos,
    )


def one_info(status: str = "Actual", **fields: Any) -> Alert:
    return Alert(
        identifier="T-1",
        sender="ops@example.org",
        sent="2024-05-01T10:00:00+00:00",
        status=status,
        msg_type="Alert",
        scope="Public",
        infos=[Info(**fields)],
    )


# -- language selection ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        ("es-US", "es-US"),
        ("ES-us", "es-US"),
        ("es", "es-US"),
        ("es-MX", "es-US"),
        ("es_419", "es-US"),
        ("en-US", "en-US"),
        ("en-GB", "en-US"),
        ("fr-CA", "en-US"),
        ("", "en-US"),
    ],
)
def test_select_info_language_order(amber: Alert, wanted: str, expected: str) -> None:
    info = select_info(amber, wanted)
    assert info is not None and info.language == expected


def test_select_info_falls_back_to_first_without_english() -> None:
    alert = Alert(
        identifier="x",
        sender="s",
        sent="2024-01-01T00:00:00Z",
        status="Actual",
        msg_type="Alert",
        scope="Public",
        infos=[Info(language="de-DE", event="Sturm"), Info(language="fr-FR")],
    )
    assert select_info(alert, "ja-JP").language == "de-DE"  # type: ignore[union-attr]
    assert select_info(alert, "fr").language == "fr-FR"  # type: ignore[union-attr]


def test_multilingual_render_picks_the_readers_language(amber: Alert) -> None:
    renderer = Renderer()
    es = renderer.render(amber, "push", "es-US")
    en = renderer.render(amber, "push", "en-US")
    assert es.language == "es-US"
    assert "Alerta Amber en el condado de Los Ángeles" in es.body
    assert "condado de Los Ángeles" in es.body
    assert es.subject == "Abducción de Niño"
    assert "Amber Alert in Los Angeles County" in en.body
    assert "Los Angeles Police Dept - LAPD" in en.body
    assert en.subject == "Child Abduction"
    # Spanish labels for the Spanish block, English for the English one.
    assert "Zona: condado de Los Ángeles" in es.body
    assert "Area: Los Angeles County" in en.body


def test_email_has_description_reflowed_and_subject(amber: Alert) -> None:
    msg = Renderer().render(amber, "email", "en")
    assert msg.subject == "Child Abduction: Amber Alert in Los Angeles County"
    assert "WEARING RED SHORTS, WHITE T-SHIRT, W/BLUE COLLAR. LOCATION:" in msg.body
    assert "Severity: Severe / Immediate / Likely" in msg.body
    assert "\n\n\n" not in msg.body


# -- status prefixes -----------------------------------------------------------------------


@pytest.mark.parametrize("channel", ["push", "sms", "email"])
@pytest.mark.parametrize(("status", "word"), [("Test", "TEST"), ("Exercise", "EXERCISE")])
def test_non_actual_status_is_visible(amber: Alert, channel: str, status: str, word: str) -> None:
    for lang in ("en-US", "es-US"):
        msg = Renderer().render(with_status(amber, status), channel, lang)
        assert msg.body.startswith(word) or msg.body.startswith(f"*** {word}")
        if channel != "sms":
            assert msg.subject.startswith(f"{word}: ")


@pytest.mark.parametrize("channel", ["push", "sms", "email"])
def test_actual_alert_has_no_status_prefix(amber: Alert, channel: str) -> None:
    msg = Renderer().render(amber, channel, "en")
    assert "TEST" not in msg.body and "EXERCISE" not in msg.body


def test_status_prefix_survives_truncation() -> None:
    alert = one_info("Test", event="Flood", instruction="move to higher ground " * 300)
    for channel in ("push", "sms"):
        assert Renderer().render(alert, channel, "en").body.startswith("TEST: ")


def test_cancel_and_update_are_labelled(amber: Alert) -> None:
    renderer = Renderer()
    assert renderer.render(with_status(amber, "Actual", "Cancel"), "push", "en").subject == (
        "CANCELLED: Child Abduction"
    )
    body = renderer.render(with_status(amber, "Exercise", "Update"), "sms", "en").body
    assert body.startswith("EXERCISE: UPDATE: ")


# -- SMS encoding and budgets ----------------------------------------------------------------


def test_gsm7_detection() -> None:
    assert is_gsm7("Evacuate now! Shelter @ 5th & Main (ÄÖÑÜ §) é è")
    assert is_gsm7("braces {} [] ~ | ^ € \\")  # extension table
    assert not is_gsm7("Abducción")  # ó is not in GSM 03.38
    assert not is_gsm7("smart “quotes”")
    assert not is_gsm7("…")
    assert not is_gsm7("地震")


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("", 0),
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("a" * 459, 3),
        ("a" * 460, 4),
        ("€" * 80, 1),
        ("€" * 81, 2),
        ("ó" * 70, 1),
        ("ó" * 71, 2),
        ("ó" * 201, 3),
        ("ó" * 202, 4),
        ("😀" * 35, 1),
        ("😀" * 36, 2),
    ],
)
def test_sms_segments(text: str, segments: int) -> None:
    assert sms_segments(text) == segments


WORDS = ["move", "to", "higher", "ground", "avoid", "flooded", "roads", "now"]


def long_instruction(n: int = 400) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def test_sms_gsm7_budget_is_three_segments() -> None:
    alert = one_info(event="Flood Warning", instruction=long_instruction())
    body = Renderer().render(alert, "sms", "en").body
    assert is_gsm7(body)
    assert sms_segments(body) == 3
    assert 440 <= len(body) <= 459  # uses the 3 x 153 septet budget, not more
    assert body.endswith("...")  # "…" is not GSM-7 and would force UCS-2
    assert body[:-3].split()[-1] in WORDS  # cut on a word boundary


def test_sms_unicode_budget_is_three_ucs2_segments() -> None:
    alert = one_info(
        language="es-US", event="Inundación", instruction="diríjase a terreno más alto " * 100
    )
    body = Renderer().render(alert, "sms", "es").body
    assert not is_gsm7(body)
    assert sms_segments(body) == 3
    assert 180 <= len(body) <= 201
    assert body.endswith("…")
    assert body[:-1].split()[-1] in {"diríjase", "a", "terreno", "más", "alto"}


def test_short_sms_is_untouched(amber: Alert) -> None:
    body = Renderer().render(amber, "sms", "en").body
    assert not body.endswith(("...", "…"))
    assert sms_segments(body) <= 3
    assert body.startswith("Child Abduction: Amber Alert in Los Angeles County.")


def test_push_body_and_email_subject_budgets() -> None:
    alert = one_info(
        event="Flood", headline="river levels rising " * 40, instruction=long_instruction(600)
    )
    renderer = Renderer()
    push = renderer.render(alert, "push", "en")
    assert len(push.body) <= PUSH_BODY_MAX and push.body.endswith("…")
    assert len(push.body) > PUSH_BODY_MAX - 20
    email = renderer.render(alert, "email", "en")
    assert len(email.subject) <= SUBJECT_MAX and email.subject.endswith("…")
    assert "\n" not in email.subject
    assert long_instruction(600) in email.body  # email bodies are not cut


def test_plain_text_is_not_html_escaped() -> None:
    alert = one_info(event="Fire", instruction="Leave <now> & take pets")
    assert "Leave <now> & take pets" in Renderer().render(alert, "email", "en").body


def test_alert_without_info_still_renders() -> None:
    alert = Alert(
        identifier="x",
        sender="s",
        sent="2024-01-01T00:00:00Z",
        status="Test",
        msg_type="Alert",
        scope="Public",
    )
    msg = Renderer().render(alert, "push", "en")
    assert msg.body.startswith("TEST: Alert")


def test_expires_is_formatted(amber: Alert) -> None:
    alert = one_info(event="Heat", expires="2024-07-01T18:00:00-07:00")
    assert "Expires: 2024-07-01 18:00 UTC-07:00" in Renderer().render(alert, "push", "en").body


def test_unknown_channel_is_rejected(amber: Alert) -> None:
    with pytest.raises(ValueError, match="unknown channel"):
        Renderer().render(amber, "fax", "en")


# -- cache ----------------------------------------------------------------------------------


def test_render_cache_hits_per_alert_channel_language(amber: Alert) -> None:
    renderer = Renderer()
    first = renderer.render(amber, "sms", "es-US")
    assert renderer.render(amber, "sms", "es-US") is first
    info = renderer.cache_info()
    assert (info.hits, info.misses, info.size) == (1, 1, 1)
    renderer.render(amber, "push", "es-US")
    renderer.render(amber, "sms", "en-US")
    # A new CAP message (different sent time) is a different cache entry.
    renderer.render(
        Alert(
            identifier=amber.identifier,
            sender=amber.sender,
            sent="2003-06-12T00:00:00-07:00",
            status="Actual",
            msg_type="Update",
            scope="Public",
            infos=amber.infos,
        ),
        "sms",
        "es-US",
    )
    assert renderer.cache_info().misses == 4


def test_render_cache_is_bounded(amber: Alert) -> None:
    renderer = Renderer(cache_size=2)
    a = renderer.render(amber, "push", "en")
    renderer.render(amber, "sms", "en")
    renderer.render(amber, "email", "en")  # evicts push/en (least recently used)
    assert renderer.cache_info().size == 2
    assert renderer.render(amber, "push", "en") is not a


def test_custom_template_dir(tmp_path: Path, amber: Alert) -> None:
    (tmp_path / "push.j2").write_text(
        "{% set subject %}{{ prefix }}custom{% endset %}{{ prefix }}{{ event }} / {{ areas }}\n"
    )
    msg = Renderer(tmp_path).render(with_status(amber, "Test"), "push", "es")
    assert msg.subject == "TEST: custom"
    assert msg.body == "TEST: Abducción de Niño / condado de Los Ángeles"
