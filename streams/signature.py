"""XML-DSig verification of signed CAP messages (signxml), against a pinned certificate.

CAP 1.2 section 3.3.2.1 (and the IPAWS and NAAD profiles) sign the whole ``<alert>`` with
an *enveloped* signature (``<Reference URI="">``). We verify exactly that shape:

* the document first goes through the hardened parser of :mod:`streams.cap` (no DTD, no
  entities, size and depth limits), so a hostile document is refused before signxml
  sees it;
* the signature must verify with the sender's registered certificate (``x509_cert``
  pinning: a certificate embedded in ``<KeyInfo>`` is never trusted on its own);
* it must cover the whole document: an enveloped signature (a child of ``<alert>``)
  with one reference, ``URI=""``, whose signed element is the document root. A
  signature over a sub-element (or a second copy of the alert wrapped around a signed
  one) is rejected, which defeats XML-signature-wrapping. Several enveloped signatures
  (NAAD: originator + NAADS) are each tried; one must verify with the pinned key;
* ``legacy=False`` (the default) refuses SHA-1 signature and digest methods and
  signature elements that break the XML-DSig schema. Canada's NAAD signs with rsa-sha1
  and an ``Id="NAADS Signature"`` that is not an XML ID; ``legacy=True`` accepts both
  (enable it per sender, knowingly).
"""

from __future__ import annotations

import copy
from datetime import datetime

from cryptography import x509
from lxml import etree
from signxml import InvalidInput, SignatureConfiguration, XMLVerifier
from signxml.algorithms import DigestAlgorithm, SignatureMethod
from signxml.exceptions import InvalidCertificate, InvalidDigest, InvalidSignature

from streams.cap import DEFAULT_LIMITS, DSIG_NS, CapError, CapLimits, parse_xml

_SIGNATURE = f"{{{DSIG_NS}}}Signature"
_REFERENCE = f"{{{DSIG_NS}}}SignedInfo/{{{DSIG_NS}}}Reference"


class SignatureError(ValueError):
    """A signature that is missing or does not verify. ``reason`` is a DLQ code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _config(legacy: bool, at: datetime | None) -> SignatureConfiguration:
    default = SignatureConfiguration()
    methods, digests = default.signature_methods, default.digest_algorithms
    if legacy:
        methods = methods | {SignatureMethod.RSA_SHA1}
        digests = digests | {DigestAlgorithm.SHA1}
    return SignatureConfiguration(signature_methods=methods, digest_algorithms=digests,
                                  verification_time=at)


def load_certificate(cert_pem: bytes) -> x509.Certificate:
    """Parse a PEM certificate; ``SignatureError("bad_certificate")`` if it is not one."""
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise SignatureError("bad_certificate", f"not a PEM X.509 certificate: {exc}") from None


def has_signature(root: etree._Element) -> bool:
    """True when the alert carries an XML-DSig ``<Signature>`` as a direct child."""
    return any(child.tag == _SIGNATURE for child in root)


def verify_signature(data: bytes, cert_pem: bytes | x509.Certificate, *,
                     legacy: bool = False, at: datetime | None = None,
                     limits: CapLimits = DEFAULT_LIMITS) -> None:
    """Verify the enveloped XML-DSig signature of a CAP document against ``cert_pem``.

    Returns None when the whole document is signed by the certificate's key; raises
    :class:`SignatureError` otherwise, with ``reason`` one of ``unsigned``,
    ``bad_signature`` (does not verify, wrong key, tampered content, refused algorithm),
    ``signature_scope`` (does not cover the whole alert), ``bad_certificate`` or
    ``bad_xml`` (the document itself is refused by the hardened parser). ``legacy``: see
    the module docstring. ``at`` checks the certificate's validity at that time instead of
    now (audit or replay of archived messages, e.g. at their ``sent`` time).
    """
    try:
        root = parse_xml(data, limits)
    except CapError as exc:
        raise SignatureError("bad_xml", f"{exc.reason}: {exc}") from None
    signatures = [el for el in root.iter(_SIGNATURE)]
    if not signatures:
        raise SignatureError("unsigned", "the message carries no XML signature")
    if any(sig.getparent() is not root for sig in signatures):
        raise SignatureError("signature_scope", "an XML signature is not a direct child of "
                                                "<alert>: CAP signatures are enveloped")
    cert = cert_pem if isinstance(cert_pem, x509.Certificate) else load_certificate(cert_pem)
    config = _config(legacy, at)
    first_error: SignatureError | None = None
    for candidate in _candidates(root, len(signatures)):
        try:
            _verify_one(candidate, cert, config, legacy)
            return
        except SignatureError as exc:
            first_error = first_error or exc
    assert first_error is not None
    raise first_error


def _candidates(root: etree._Element, count: int) -> list[etree._Element]:
    """Documents to check, each holding the one signature signxml will verify (its first).

    NAAD (Canada) messages carry two enveloped signatures: the originator's (Environment
    Canada) over the alert alone, and NAADS's, placed first, over the alert *including*
    the originator's signature. So we try the document as is (the first signature, with
    the others as signed content), then for each signature a copy keeping only it. The
    pinned certificate decides which one must verify.
    """
    if count == 1:
        return [root]
    candidates = [root]
    for n in range(count):
        copy_ = copy.deepcopy(root)
        for k, sig in enumerate([el for el in copy_ if el.tag == _SIGNATURE]):
            if k != n:
                copy_.remove(sig)
        candidates.append(copy_)
    return candidates


def _verify_one(root: etree._Element, cert: x509.Certificate,
                config: SignatureConfiguration, legacy: bool) -> None:
    signature = next(el for el in root if el.tag == _SIGNATURE)  # the one signxml checks
    references = signature.findall(_REFERENCE)
    if len(references) != 1 or references[0].get("URI") != "":
        uris = [r.get("URI") for r in references]
        raise SignatureError("signature_scope", f"signature references {uris!r}; CAP signs the "
                                                "whole document (one Reference URI=\"\")")
    try:
        result = XMLVerifier().verify(root, x509_cert=cert, expect_config=config,
                                      validate_schema=not legacy)
    except (InvalidSignature, InvalidDigest, InvalidCertificate, InvalidInput) as exc:
        raise SignatureError("bad_signature", f"signature does not verify: {exc}") from None
    except Exception as exc:  # signxml raises assorted lxml/cryptography errors on junk
        raise SignatureError("bad_signature",
                             f"signature cannot be checked: {type(exc).__name__}: {exc}") from None
    results = result if isinstance(result, list) else [result]
    signed = results[0].signed_xml
    if len(results) != 1 or signed is None or signed.tag != root.tag:
        raise SignatureError("signature_scope", "the signed content is not the whole <alert>")
