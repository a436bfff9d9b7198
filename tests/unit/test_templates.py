"""Renderer: language selection, status prefixes, time zones, places, WEA texts, budgets,
SMS encoding, cache, and golden files for every template in English, Spanish and French.

Golden files live in tests/golden/; regenerate them with ``TOCSIN_UPDATE_GOLDEN=1``
and review the diff by eye (they must read well to a native speaker).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from streams.cap import parse_cap
from streams.records import Alert, Geocode, Info
from templates.budgets import Budgets
from templates.render import (
    KINDS,
    PUSH_BODY_MAX,
    PUSH_TITLE_MAX,
    SUBJECT_MAX,
    WEA_LONG_MAX,
    WEA_SHORT_MAX,
    Renderer,
    is_gsm7,
    select_info,
    sms_segments,
)

AMBER = "cap12/oasiscap__spec12_A4_amber_multilingual.xml"
STORM = "cap12/oasiscap__spec12_A2_severe_thunderstorm.xml"
MICHIGAN = "cap12/oasiscap__ipaws_civil_emergency_michigan.xml"
GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def load_cap(path: Path) -> Alert:
    """A real CAP file through the real parser."""
    return parse_cap(path.read_bytes(), source=path.name)[0]


@pytest.fixture
def amber(data_dir: Path) -> Alert:
    return load_cap(data_dir / "cap" / AMBER)


@pytest.fixture
def storm(data_dir: Path) -> Alert:
    return load_cap(data_dir / "cap" / STORM)


def with_status(alert: Alert, status: str, msg_type: str = "Alert") -> Alert:
    return msgspec.structs.replace(alert, status=status, msg_type=msg_type)


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
    assert "Severity: Severe\nUrgency: Immediate\nCertainty: Likely" in msg.body
    es = Renderer().render(amber, "email", "es")
    assert "Gravedad: Grave\nUrgencia: Inmediata\nCerteza: Probable" in es.body
    fr = Renderer().render(amber, "email", "fr")
    assert "Gravité : Grave\nUrgence : Immédiate\nCertitude : Probable" in fr.body
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


# -- expiry in the reader's time zone ------------------------------------------------------


@pytest.mark.parametrize(
    ("language", "timezone", "line"),
    [
        # 18:00 at UTC-7 is 01:00 UTC the next day.
        ("en", "America/Chicago", "Until 8:00 PM CDT Mon, Jul 1"),
        ("en", "America/Los_Angeles", "Until 6:00 PM PDT Mon, Jul 1"),
        ("en", "Europe/London", "Until 2:00 AM BST Tue, Jul 2"),
        ("en", "Asia/Kolkata", "Until 6:30 AM IST Tue, Jul 2"),
        ("en", "America/Sao_Paulo", "Until 10:00 PM UTC-3 Mon, Jul 1"),
        ("en", "UTC", "Until 1:00 AM UTC Tue, Jul 2"),
        ("es", "America/Mexico_City", "Hasta las 19:00 CST del lunes 1 de julio"),
        ("es", "Europe/Madrid", "Hasta las 3:00 CEST del martes 2 de julio"),
        ("fr", "America/Toronto", "Jusqu'au lundi 1er juillet à 21 h EDT"),
        ("fr", "Asia/Kolkata", "Jusqu'au mardi 2 juillet à 6 h 30 IST"),
        # No zone known, or an unknown one: the sender's own offset, still unambiguous.
        ("en", "", "Until 6:00 PM UTC-7 Mon, Jul 1"),
        ("fr", "Mars/Olympus_Mons", "Jusqu'au lundi 1er juillet à 18 h UTC-7"),
    ],
)
def test_expiry_is_shown_in_the_readers_time_zone(language: str, timezone: str, line: str) -> None:
    alert = one_info(event="Heat", expires="2024-07-01T18:00:00-07:00")
    for channel in ("push", "email"):
        body = Renderer().render(alert, channel, language, timezone=timezone).body
        assert line in body.splitlines()


def test_winter_time_and_one_oclock_in_spanish() -> None:
    alert = one_info(event="Frío", expires="2024-01-15T07:05:00+00:00")
    body = Renderer().render(alert, "sms", "es", timezone="America/Chicago").body
    assert "Hasta la 1:05 CST del lunes 15 de enero." in body


def test_short_expiry_in_the_90_character_text() -> None:
    alert = one_info(event="Flood Warning", expires="2024-07-01T18:30:00-07:00")
    renderer = Renderer()
    assert renderer.render(alert, "wea90", "en", timezone="America/Chicago").body == (
        "Flood Warning in this area until 8:30 PM CDT."
    )
    assert renderer.render(alert, "wea90", "fr", timezone="America/Toronto").body == (
        "Flood Warning dans ce secteur jusqu'à 21 h 30 EDT."
    )


# -- the matched place ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("language", "line"),
    [
        ("en", "Affects your place: Home"),
        ("es-MX", "Afecta a su lugar: Home"),
        ("fr-CA", "Concerne votre lieu : Home"),
    ],
)
def test_the_matched_place_is_named(amber: Alert, language: str, line: str) -> None:
    renderer = Renderer()
    for channel in ("push", "sms", "email"):
        msg = renderer.render(amber, channel, language, place="Home")
        assert line in msg.body, channel
        assert line in renderer.render(amber, "email", language, place="Home").html
        assert "your place" not in renderer.render(amber, channel, language).body


def test_place_names_are_not_template_code_and_are_escaped_in_html(amber: Alert) -> None:
    place = "{{ 7*7 }} <b>Mum's</b> & co"
    msg = Renderer().render(amber, "email", "en", place=place)
    assert f"Affects your place: {place}" in msg.body
    assert "Affects your place: {{ 7*7 }} &lt;b&gt;Mum&#39;s&lt;/b&gt; &amp; co" in msg.html


def test_renders_are_cached_per_reader(amber: Alert) -> None:
    renderer = Renderer()
    home = renderer.render(amber, "push", "en", timezone="UTC", place="Home")
    assert renderer.render(amber, "push", "en", timezone="UTC", place="Home") is home
    assert renderer.render(amber, "push", "en", timezone="UTC", place="Work") is not home
    assert renderer.render(amber, "push", "en", timezone="Europe/Paris", place="Home") is not home
    assert renderer.cache_info().misses == 3


# -- cancellation notices -----------------------------------------------------------------


@pytest.mark.parametrize("channel", KINDS)
def test_a_cancel_does_not_repeat_the_call_to_action(storm: Alert, channel: str) -> None:
    cancel = with_status(storm, "Actual", "Cancel")
    msg = Renderer().render(cancel, channel, "en", timezone="America/Chicago", place="Home")
    assert msg.body.startswith("CANCELLED: ")
    assert "TAKE COVER" not in msg.body and "Until" not in msg.body
    assert "This alert has been cancelled." in msg.body
    assert "SEVERE THUNDERSTORM" in msg.body
    es = Renderer().render(cancel, channel, "es", timezone="America/Chicago")
    assert es.body.startswith("CANCELADA: ") and "Esta alerta ha sido cancelada." in es.body


# -- WEA texts ------------------------------------------------------------------------------


def test_wea_prefers_the_senders_cmam_texts(data_dir: Path) -> None:
    alert = load_cap(data_dir / "cap" / MICHIGAN)
    renderer = Renderer()
    short = renderer.render(alert, "wea90", "en").body
    long = renderer.render(alert, "wea360", "en").body
    assert short == (
        "Stay Home order extended to 5/15. Some restrictions lifted. www.michigan.gov/coronvirus"
    )
    assert long.startswith("From the Governor's Office: The State of Michigan has extended")
    assert long.endswith("For additional guidance, see www.michigan.gov/coronavirus")
    assert len(short) <= WEA_SHORT_MAX and len(long) <= WEA_LONG_MAX
    # A TEST keeps its label even in the sender's own text.
    test = with_status(alert, "Test")
    assert Renderer().render(test, "wea90", "en").body.startswith("TEST: Stay Home order")


def test_an_overlong_cmam_text_is_still_cut_to_budget() -> None:
    alert = one_info(
        event="Flood",
        parameters=[Geocode("CMAMtext", "Flash flood warning " * 10)],
    )
    body = Renderer().render(alert, "wea90", "en").body
    assert len(body) <= WEA_SHORT_MAX and body.endswith("...")


@pytest.mark.parametrize(("channel", "limit"), [("wea90", WEA_SHORT_MAX), ("wea360", WEA_LONG_MAX)])
def test_composed_wea_text_is_cut_on_a_word_boundary(
    storm: Alert, channel: str, limit: int
) -> None:
    long_storm = msgspec.structs.replace(
        storm, infos=[msgspec.structs.replace(storm.infos[0], instruction=long_instruction(200))]
    )
    for language in ("en", "es", "fr"):
        body = Renderer().render(long_storm, channel, language, timezone="UTC").body
        assert limit - 15 <= len(body) <= limit
        assert body.endswith("...") and body[:-3].split()[-1] in WORDS
        assert "\n" not in body


# -- budgets --------------------------------------------------------------------------------


def test_a_long_description_is_cut_everywhere_but_the_email_body(storm: Alert) -> None:
    huge = msgspec.structs.replace(
        storm.infos[0],
        headline="SEVERE THUNDERSTORM WARNING " * 30,
        description="HAIL AND DAMAGING WINDS. " * 2000,
        instruction=long_instruction(2000),
        areas=storm.infos[0].areas * 50,
    )
    alert = msgspec.structs.replace(storm, infos=[huge])
    renderer = Renderer()
    for language in ("en", "es", "fr"):
        push = renderer.render(alert, "push", language, place="Home", timezone="UTC")
        assert len(push.subject) <= PUSH_TITLE_MAX and len(push.body) <= PUSH_BODY_MAX
        sms = renderer.render(alert, "sms", language, place="Home", timezone="UTC")
        assert sms_segments(sms.body) <= 3
        email = renderer.render(alert, "email", language, place="Home", timezone="UTC")
        assert len(email.subject) <= SUBJECT_MAX and "\n" not in email.subject
        for kind, limit in (("wea90", WEA_SHORT_MAX), ("wea360", WEA_LONG_MAX)):
            assert len(renderer.render(alert, kind, language).body) <= limit


@pytest.mark.parametrize("segments", [1, 2, 5])
def test_configured_sms_segment_maximum(segments: int) -> None:
    renderer = Renderer(budgets=Budgets(sms_segments=segments))
    gsm = renderer.render(one_info(event="Flood", instruction=long_instruction()), "sms", "en")
    assert is_gsm7(gsm.body) and sms_segments(gsm.body) == segments
    assert len(gsm.body) > (160 if segments == 1 else 153 * segments) - 15
    ucs2 = renderer.render(
        one_info(
            language="es", event="Inundación", instruction="diríjase a terreno más alto " * 80
        ),
        "sms",
        "es",
    )
    assert not is_gsm7(ucs2.body) and sms_segments(ucs2.body) == segments
    assert len(ucs2.body) > (70 if segments == 1 else 67 * segments) - 12


def test_push_title_budget() -> None:
    alert = one_info(event="Extremely dangerous and life threatening flash flood emergency " * 3)
    title = Renderer().render(alert, "push", "en").subject
    assert len(title) <= PUSH_TITLE_MAX and title.endswith("…")
    assert len(Renderer(budgets=Budgets(push_title=40)).render(alert, "push", "en").subject) <= 40


def test_nonsense_budgets_are_refused() -> None:
    with pytest.raises(ValueError, match="sms_segments"):
        Budgets(sms_segments=0)
    with pytest.raises(ValueError, match="push_title"):
        Budgets(push_title=5)


# -- email HTML -----------------------------------------------------------------------------


def test_email_html_part_escapes_cap_text() -> None:
    alert = one_info(
        language="fr-CA",
        event="Feu",
        headline="<script>alert(1)</script>",
        instruction="Partez <maintenant> & emmenez vos animaux",
        description="Premier paragraphe.\n\n  Second\n  paragraphe.",
        web="https://example.org/a?b=1&c=2",
    )
    html = Renderer().render(alert, "email", "fr").html
    assert html.startswith("<!DOCTYPE html>") and '<html lang="fr-CA">' in html
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Partez &lt;maintenant&gt; &amp; emmenez vos animaux" in html
    assert "<p>Premier paragraphe.</p>" in html and "<p>Second paragraphe.</p>" in html
    assert '<a href="https://example.org/a?b=1&amp;c=2">' in html
    linked = one_info(event="Flood", instruction="Leave now. See https://ex.org/f?a=<b>.")
    assert (
        'See <a href="https://ex.org/f?a=">https://ex.org/f?a=</a>&lt;b&gt;.'
        in Renderer().render(linked, "email", "en").html
    )
    assert Renderer().render(alert, "push", "fr").html == ""


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


# -- golden files ---------------------------------------------------------------------------

# Two real CAP messages (an English-only NWS warning with an expiry; the bilingual AMBER
# alert) and, per reader language, a time zone and a place name.
GOLDEN_CAPS = {"nws-storm": STORM, "amber": AMBER}
READERS = {
    "en": ("America/Chicago", "Home"),
    "es": ("America/Los_Angeles", "Casa"),
    "fr": ("America/Toronto", "Chalet"),
}
GOLDEN_FILES = {
    "push": ("push.txt", "Title: {subject}\n\n{body}\n"),
    "sms": ("sms.txt", "{body}\n"),
    "email": ("email.txt", "Subject: {subject}\n\n{body}\n"),
    "wea90": ("wea90.txt", "{body}\n"),
    "wea360": ("wea360.txt", "{body}\n"),
}


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("TOCSIN_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.is_file(), f"{path} missing: run with TOCSIN_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from its golden file"


@pytest.mark.parametrize("language", sorted(READERS))
@pytest.mark.parametrize("cap", sorted(GOLDEN_CAPS))
@pytest.mark.parametrize("kind", KINDS)
def test_golden(data_dir: Path, cap: str, language: str, kind: str) -> None:
    alert = load_cap(data_dir / "cap" / GOLDEN_CAPS[cap])
    timezone, place = READERS[language]
    msg = Renderer().render(alert, kind, language, timezone=timezone, place=place)
    suffix, layout = GOLDEN_FILES[kind]
    _check_golden(f"{cap}.{language}.{suffix}", layout.format(subject=msg.subject, body=msg.body))
    if kind == "email":
        _check_golden(f"{cap}.{language}.email.html", msg.html)
