"""Words and date formats the templates add around the CAP text, per language.

CAP text arrives in whatever languages the sender wrote (the renderer picks the best
info block); what Tocsin itself writes -- labels, "until ...", "your place ..." -- is
in the *reader's* language when we have it (English, Spanish, French), else the info
block's, else English. A Spanish reader of an English-only NWS warning therefore gets
English hazard text framed by Spanish labels and a Spanish expiry time, which they
can read even when the hazard text is hard going.

Times are shown in the recipient's own time zone (``Subscription.timezone``), with the
zone's abbreviation when it has a well-known one (``PDT``) and a UTC offset otherwise
(``UTC-3``), so "until 4:00 PM" can never be read in the wrong zone. Month and day
names are tabulated here rather than taken from the C locale (``strftime``'s names
depend on the process locale, which a worker does not control).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "LABELS",
    "LANGUAGES",
    "Expiry",
    "cap_word",
    "format_expiry",
    "labels_for",
    "primary",
]

LANGUAGES = ("en", "es", "fr")

# Status words (TEST, EXERCISE) stay in English on purpose: they are what operators and
# tests grep. ``your_place`` takes the citizen's own name for the place or zone; ``colon``
# follows every "Label" in the templates ("Zone : ..." in French).
LABELS: dict[str, dict[str, str]] = {
    "en": {
        "alert": "Alert",
        "area": "Area",
        "source": "From",
        "more": "More",
        "instruction": "What to do",
        "event": "Event",
        "severity": "Severity",
        "urgency": "Urgency",
        "certainty": "Certainty",
        "update": "UPDATE",
        "cancel": "CANCELLED",
        "cancelled_note": "This alert has been cancelled.",
        "not_actual": "this is not a real alert",
        "your_place": "Affects your place: {place}",
        "in_area": "in this area",
        "colon": ":",
    },
    "es": {
        "alert": "Alerta",
        "area": "Zona",
        "source": "De",
        "more": "Más información",
        "instruction": "Qué hacer",
        "event": "Evento",
        "severity": "Gravedad",
        "urgency": "Urgencia",
        "certainty": "Certeza",
        "update": "ACTUALIZACIÓN",
        "cancel": "CANCELADA",
        "cancelled_note": "Esta alerta ha sido cancelada.",
        "not_actual": "esta no es una alerta real",
        "your_place": "Afecta a su lugar: {place}",
        "in_area": "en esta zona",
        "colon": ":",
    },
    "fr": {
        "alert": "Alerte",
        "area": "Zone",
        "source": "De",
        "more": "Plus d'informations",
        "instruction": "Que faire",
        "event": "Événement",
        "severity": "Gravité",
        "urgency": "Urgence",
        "certainty": "Certitude",
        "update": "MISE À JOUR",
        "cancel": "ANNULÉE",
        "cancelled_note": "Cette alerte a été annulée.",
        "not_actual": "ceci n'est pas une vraie alerte",
        "your_place": "Concerne votre lieu : {place}",
        "in_area": "dans ce secteur",
        "colon": " :",  # French puts a (narrow) space before a colon
    },
}

# CAP's severity, urgency and certainty words (English enumerations in every CAP file).
_CAP_WORDS: dict[str, dict[str, str]] = {
    "es": {
        "Extreme": "Extrema", "Severe": "Grave", "Moderate": "Moderada", "Minor": "Menor",
        "Immediate": "Inmediata", "Expected": "Esperada", "Future": "Futura", "Past": "Pasada",
        "Observed": "Observada", "Likely": "Probable", "Possible": "Posible",
        "Unlikely": "Improbable", "Unknown": "Desconocida",
    },
    "fr": {
        "Extreme": "Extrême", "Severe": "Grave", "Moderate": "Modérée", "Minor": "Mineure",
        "Immediate": "Immédiate", "Expected": "Attendue", "Future": "Future", "Past": "Passée",
        "Observed": "Observée", "Likely": "Probable", "Possible": "Possible",
        "Unlikely": "Peu probable", "Unknown": "Inconnue",
    },
}  # fmt: skip

_DAYS = {
    "en": ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"),
    "es": ("lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"),
    "fr": ("lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"),
}
_MONTHS = {
    "en": ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
    "es": ("enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto",
           "septiembre", "octubre", "noviembre", "diciembre"),
    "fr": ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août",
           "septembre", "octobre", "novembre", "décembre"),
}  # fmt: skip


def cap_word(value: str, language: str) -> str:
    """A CAP severity/urgency/certainty value in ``language`` (as sent when unknown)."""
    return _CAP_WORDS.get(primary(language), {}).get(value, value)


def primary(language: str) -> str:
    """``es-US`` / ``es_419`` -> ``es``."""
    return language.strip().replace("_", "-").split("-")[0].lower()


def labels_for(*languages: str) -> tuple[str, dict[str, str]]:
    """The first of ``languages`` we have labels for (English otherwise), and its labels."""
    for language in languages:
        lang = primary(language or "")
        if lang in LABELS:
            return lang, LABELS[lang]
    return "en", LABELS["en"]


@dataclass(frozen=True, slots=True)
class Expiry:
    """An expiry time in words: ``until`` starts a line ("Until 4:00 PM PDT Tue, Jun 17"),
    ``until_short`` is the time only ("until 4:00 PM PDT"), for 90-character texts."""

    when: str
    until: str
    until_short: str


def _zone_name(dt: datetime) -> str:
    """``PDT`` where the zone has a letter abbreviation, else ``UTC-3`` / ``UTC+5:30``."""
    name = dt.tzname() or ""
    if name.isalpha() and name.isupper():
        return name
    offset = dt.utcoffset() or timedelta(0)
    if not offset:
        return "UTC"
    minutes = int(offset.total_seconds() // 60)
    sign, minutes = ("+" if minutes > 0 else "-"), abs(minutes)
    hours, rest = divmod(minutes, 60)
    return f"UTC{sign}{hours}" + (f":{rest:02d}" if rest else "")


def _localise(dt: datetime, timezone: str) -> datetime:
    if timezone:
        try:
            return dt.astimezone(ZoneInfo(timezone))
        except (ZoneInfoNotFoundError, ValueError):
            pass  # an unknown zone shows the sender's own offset, still unambiguous
    return dt


def format_expiry(value: str | None, timezone: str, language: str) -> Expiry | None:
    """A CAP ``expires`` in the reader's zone and words; ``None`` when absent or unparsable.

    A naive time (CAP forbids it, but feeds do it) is shown as written, without a zone.
    """
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    lang, _ = labels_for(language)
    zone = ""
    if dt.tzinfo is not None:
        dt = _localise(dt, timezone)
        zone = " " + _zone_name(dt)
    day, month = _DAYS[lang][dt.weekday()], _MONTHS[lang][dt.month - 1]
    if lang == "es":
        time = f"{dt.hour}:{dt.minute:02d}{zone}"
        article = "la" if dt.hour == 1 else "las"  # "la una", "las dos"
        when = f"{day} {dt.day} de {month}, {time}"
        return Expiry(when, f"Hasta {article} {time} del {day} {dt.day} de {month}",
                      f"hasta {article} {time}")  # fmt: skip
    if lang == "fr":
        time = f"{dt.hour} h" + (f" {dt.minute:02d}" if dt.minute else "") + zone
        day_no = "1er" if dt.day == 1 else str(dt.day)
        when = f"{day} {day_no} {month}, {time}"
        return Expiry(when, f"Jusqu'au {day} {day_no} {month} à {time}", f"jusqu'à {time}")
    hour12 = dt.hour % 12 or 12
    time = f"{hour12}:{dt.minute:02d} {'AM' if dt.hour < 12 else 'PM'}{zone}"
    when = f"{day}, {month} {dt.day}, {time}"
    return Expiry(when, f"Until {time} {day}, {month} {dt.day}", f"until {time}")
