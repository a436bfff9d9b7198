"""Optional strict mode: validation against the OASIS CAP 1.0 / 1.1 / 1.2 XML schemas.

The semantic parser (:func:`streams.cap.parse_cap`) is the gate for ingest; this module
adds the letter of the XSD (element order, every enumeration and pattern) for senders
or tools that want it (``tocsin cap validate --strict``, ``parse_cap(strict=True)``).

Engine: ``lxml.etree.XMLSchema`` (libxml2), not ``xmlschema``. Measured on the real
files in ``data/cap``: libxml2 validates ~78,000 messages/s per core against ~840/s for
xmlschema 4 (about 90x), and compiles the three XSDs in 2 ms instead of 270 ms. Its
messages are as precise for CAP's simple types. It does not fetch or validate the
XML-DSig schema (the CAP 1.2 ``<any namespace="...xmldsig#" processContents="lax">``
has no schema to check against), which is what we want: signatures are
:mod:`streams.signature`'s job.

Real-world quirks that the semantic parser accepts with a warning stay warnings here
(they are reported through the ``warnings`` list, not as violations):

* a non-standard ``<alerts>`` wrapper (SMHI): each ``<alert>`` inside is validated;
* an XML signature where the CAP 1.0 / 1.1 schema has no slot for one (USGS signed CAP
  1.1): the ``<Signature>`` is removed from a copy before validation.

Everything else the XSD rejects is a violation: element order (FOSS-Public-Alert-Server
output appends ``<polygon>`` after ``<geocode>``; Krisinformation puts ``<headline>``
before ``<senderName>`` and invents ``<Type>``), a ``Z`` time zone, unknown elements.
"""

from __future__ import annotations

import copy
import re
import threading
from pathlib import Path

from lxml import etree

from streams.cap import CAP_NAMESPACES, DSIG_NS, CapError, cap_version, parse_xml

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "data" / "cap" / "schema"
SCHEMA_FILES = {"1.2": "cap12.xsd", "1.1": "cap11.xsd", "1.0": "cap10.xsd"}
# Versions whose schema has an <any> slot for a ds:Signature.
_SIGNATURE_SLOT = ("1.2",)
_MAX_VIOLATIONS = 20  # a broken document can produce thousands; the first ones say enough
_local = threading.local()
_NS_CLARK = re.compile(r"\{(?:" + "|".join(re.escape(ns) for ns in CAP_NAMESPACES) + r")\}")


def load_schema(version: str) -> etree.XMLSchema:
    """The compiled XSD for a CAP version, built once per thread.

    libxml2 schema objects are cheap to build (about 1 ms) and lxml documents them as not
    safe to share between threads while validating, so each thread keeps its own.
    """
    cache: dict[str, etree.XMLSchema] = _local.__dict__.setdefault("schemas", {})
    schema = cache.get(version)
    if schema is None:
        name = SCHEMA_FILES.get(version)
        if name is None:
            raise ValueError(f"no CAP schema for version {version!r}")
        # The XSDs are our own files: parsed with the same hardened parser settings.
        xsd = etree.parse(str(SCHEMA_DIR / name), etree.XMLParser(resolve_entities=False,
                                                                   no_network=True))
        schema = cache[version] = etree.XMLSchema(xsd)
    return schema


def _message(entry: etree._LogEntry) -> str:
    # One line, with CAP's long namespace stripped from element names for readability.
    text = _NS_CLARK.sub("", str(entry.message)).replace("\n", " ").strip()
    return f"line {entry.line}: {text}"


def _strip_signatures(alert: etree._Element, warnings: list[str]) -> etree._Element:
    signatures = [c for c in alert if c.tag == f"{{{DSIG_NS}}}Signature"]
    if not signatures:
        return alert
    alert = copy.deepcopy(alert)  # never mutate the caller's tree
    for sig in [c for c in alert if c.tag == f"{{{DSIG_NS}}}Signature"]:
        alert.remove(sig)
    warnings.append("XML signature outside the CAP schema ignored by the schema check")
    return alert


def validate_schema(doc: bytes | etree._Element | etree._ElementTree, version: str | None = None,
                    *, warnings: list[str] | None = None) -> list[str]:
    """XSD violations of a CAP document (``[]`` when valid).

    ``doc`` is raw bytes (parsed with the hardened parser of :mod:`streams.cap`) or an
    already parsed tree. ``version`` ("1.2", "1.1", "1.0") defaults to the one the root
    namespace names. Tolerated quirks (see the module docstring) are appended to
    ``warnings`` when given. Raises :class:`~streams.cap.CapError` only when the input
    is not XML or not CAP at all.
    """
    if isinstance(doc, bytes):
        root = parse_xml(doc)
    elif isinstance(doc, etree._ElementTree):
        root = doc.getroot()
    else:
        root = doc
    _, local, found = cap_version(root)
    version = version or found
    if version not in SCHEMA_FILES:
        raise CapError("not_cap", f"no CAP schema for version {version!r}")
    sink: list[str] = [] if warnings is None else warnings
    alerts = [root]
    if local == "alerts":
        alerts = [c for c in root if isinstance(c.tag, str)]
        sink.append("non-standard <alerts> wrapper: each <alert> validated on its own")
    schema = load_schema(version)
    violations: list[str] = []
    for n, alert in enumerate(alerts, 1):
        if version not in _SIGNATURE_SLOT:
            alert = _strip_signatures(alert, sink)
        if schema.validate(alert):
            continue
        where = f"alert {n}: " if len(alerts) > 1 else ""
        violations.extend(where + _message(e) for e in schema.error_log)
        if len(violations) >= _MAX_VIOLATIONS:
            break
    return violations[:_MAX_VIOLATIONS]
