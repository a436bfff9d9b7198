"""Email through SMTP (aiosmtplib) over a small pool of persistent connections.

Building an ``EmailMessage`` and serialising it costs more than sending it (about
1.5 ms, i.e. ~650 messages/s per core on its own), so the MIME message -- headers,
multipart/alternative text + HTML, transfer encoding -- is built and serialised once
per (alert, language). Per recipient only a few header lines are prepended to those
bytes: ``To``, ``Message-ID`` and the ``List-Unsubscribe`` pair, which carry the
recipient's own unsubscribe link.

Each message is one SMTP transaction (MAIL, RCPT, DATA) on one of ``pool_size``
connections (opened lazily, with STARTTLS/implicit TLS and AUTH as configured), so the
server answers per recipient:

- RCPT 550/551/553 (no such mailbox, bad address): dead address, pruned;
- any other 5xx: permanent failure on this provider; 4xx anywhere: retriable;
- a connection found dead when a transaction starts (the server restarted or timed
  out an idle connection) is replaced and the message retried on the new one at once
  -- nothing had been accepted yet; a connection lost during DATA is a retriable
  failure (the Message-ID is stable across retries, so a duplicate can be spotted).

The ``Message-ID`` is deterministic per (alert, citizen) --
``<alert key>.<dedupe token>@<sender domain>``, the token an opaque hash
(:func:`channels.idempotency.dedupe_token`) -- so a message re-sent after a lost DATA
answer or a worker crash is the same message to every mail system and client that
deduplicates by Message-ID.

Server replies may quote the address, so error texts carry SMTP codes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import hashlib
import hmac
import html
import re
import ssl
from collections import OrderedDict
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from email.utils import formatdate
from urllib.parse import quote

import aiosmtplib

from channels.base import OutgoingMessage, ProviderError, SendResult
from channels.idempotency import dedupe_token
from streams.records import Channel

__all__ = ["SmtpProvider", "text_to_html", "unsubscribe_token"]

# 7bit: every part is quoted-printable/base64, so no server needs 8BITMIME.
_POLICY = email.policy.SMTP.clone(cte_type="7bit")
_DEAD_MAILBOX = frozenset({550, 551, 553})
_URL_RE = re.compile(r"https?://[^\s<>\"']+")
_MSGID_UNSAFE = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")  # not atext or "."
_CACHE = 64
_CONN = "connection:"  # error prefixes send_batch counts
_AUTH = "authentication rejected"
_GREETING_ERRORS = (aiosmtplib.SMTPConnectResponseError, aiosmtplib.SMTPHeloError)


def unsubscribe_token(secret: str, subscriber_id: str) -> str:
    """The signature an unsubscribe link carries, so nobody can unsubscribe others.

    The API that serves the link recomputes it (HMAC-SHA256, 32 hex digits).
    """
    if not secret:
        return ""
    return hmac.new(secret.encode(), subscriber_id.encode(), hashlib.sha256).hexdigest()[:32]


def text_to_html(text: str, language: str = "", title: str = "") -> str:
    """A plain, accessible HTML rendering of the rendered text body.

    Escaped paragraph by paragraph (the CAP text is untrusted), URLs linked, the
    first paragraph (the headline) emphasised.
    """

    def para(chunk: str) -> str:
        escaped = html.escape(chunk)
        linked = _URL_RE.sub(lambda m: f'<a href="{m.group(0)}">{m.group(0)}</a>', escaped)
        return linked.replace("\n", "<br>\n")

    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    parts = [f"<p><strong>{para(paragraphs[0])}</strong></p>"] if paragraphs else []
    parts += [f"<p>{para(p)}</p>" for p in paragraphs[1:]]
    lang = f' lang="{html.escape(language)}"' if language else ""
    return (
        f'<!DOCTYPE html>\n<html{lang}>\n<head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head>\n"
        f'<body style="font-family: sans-serif; line-height: 1.4">\n'
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )


def _lost(subscriber_id: str, what: str) -> SendResult:
    """A retriable failure below the SMTP conversation (connect, greeting, socket)."""
    return SendResult(subscriber_id, ok=False, error=f"{_CONN} {what}", retriable=True)


def _valid_address(address: str) -> bool:
    """Cheap sanity check: one ``@``, no whitespace or control characters (which
    would also be header injection), no angle brackets."""
    local, at, domain = address.rpartition("@")
    return (
        bool(at and local and domain)
        and len(address) <= 254
        and not any(c.isspace() or ord(c) < 32 or c in '<>",' for c in address)
    )


class SmtpProvider:
    """SMTP email provider with a pool of ``pool_size`` persistent connections."""

    streams_results = True  # send_batch takes on_result (see channels.sender)

    def __init__(
        self,
        host: str,
        port: int,
        *,
        sender: str,
        username: str = "",
        password: str = "",
        starttls: bool = False,
        use_tls: bool = False,
        tls_context: ssl.SSLContext | None = None,
        pool_size: int = 6,
        timeout_s: float = 30.0,
        unsubscribe_url: str = "",
        unsubscribe_mailto: str = "",
        unsubscribe_secret: str = "",
        name: str = "smtp",
    ) -> None:
        self.name = name
        self.channel: Channel = "email"
        self.host, self.port = host, port
        self.sender = sender
        self._mail_from = b"FROM:<" + sender.encode() + b">"
        self.username, self.password = username, password
        self.starttls, self.use_tls, self.tls_context = starttls, use_tls, tls_context
        self.pool_size = max(1, pool_size)
        self.timeout_s = timeout_s
        self.domain = sender.rpartition("@")[2] or "tocsin.invalid"
        self.unsubscribe_url = unsubscribe_url
        self.unsubscribe_mailto = unsubscribe_mailto or f"unsubscribe@{self.domain}"
        self.unsubscribe_secret = unsubscribe_secret
        self._pool: asyncio.Queue[aiosmtplib.SMTP | None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._built: OrderedDict[tuple[str, str, str, str], bytes] = OrderedDict()
        self.connects = 0  # connections opened so far (tests watch reconnects)

    # -- message ---------------------------------------------------------------------------

    def _common(self, msg: OutgoingMessage) -> bytes:
        """Everything but the per-recipient headers, serialised once per text."""
        key = (msg.alert_key, msg.language, msg.subject, msg.body)
        data = self._built.get(key)
        if data is None:
            em = EmailMessage(policy=_POLICY)
            em["From"] = self.sender
            em["Subject"] = msg.subject
            em["Date"] = formatdate(usegmt=True)
            # RFC 3834: no auto-replies, vacation notices or bounces-to-bounces.
            em["Auto-Submitted"] = "auto-generated"
            em["X-Auto-Response-Suppress"] = "All"
            if msg.language:
                em["Content-Language"] = msg.language
            em.set_content(msg.body, charset="utf-8")
            html_part = msg.html or text_to_html(msg.body, msg.language, msg.subject)
            em.add_alternative(html_part, subtype="html", charset="utf-8")
            data = self._built[key] = em.as_bytes(policy=_POLICY)
            if len(self._built) > _CACHE:
                self._built.popitem(last=False)
        return data

    def unsubscribe_headers(self, subscriber_id: str) -> str:
        """``List-Unsubscribe`` (+ ``-Post`` for one-click over HTTPS), CRLF-terminated."""
        token = unsubscribe_token(self.unsubscribe_secret, subscriber_id)
        sid = quote(subscriber_id, safe="")
        query = f"s={sid}" + (f"&t={token}" if token else "")
        subject = quote(f"unsubscribe {subscriber_id} {token}".strip())
        links = [f"<mailto:{self.unsubscribe_mailto}?subject={subject}>"]
        lines = ""
        if self.unsubscribe_url:
            sep = "&" if "?" in self.unsubscribe_url else "?"
            links.insert(0, f"<{self.unsubscribe_url}{sep}{query}>")
            # RFC 8058 one-click: mail clients POST to the https link.
            lines = "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        return f"List-Unsubscribe: {', '.join(links)}\r\n{lines}"

    def message_id(self, msg: OutgoingMessage) -> str:
        """Stable per (alert, citizen): any re-send of the message keeps its Message-ID
        (whichever of the citizen's places matched, whichever worker sends it)."""
        token = dedupe_token(msg.alert_key, msg.channel, msg.subscriber_id)
        alert = _MSGID_UNSAFE.sub("-", msg.alert_key)
        return f"<{alert}.{token}@{self.domain}>"

    def render(self, msg: OutgoingMessage) -> bytes:
        """The full message bytes for one recipient."""
        head = (
            f"To: {msg.address}\r\nMessage-ID: {self.message_id(msg)}\r\n"
            + self.unsubscribe_headers(msg.subscriber_id)
        )
        return head.encode() + self._common(msg)

    # -- connections ---------------------------------------------------------------------------

    def _queue(self) -> asyncio.Queue[aiosmtplib.SMTP | None]:
        loop = asyncio.get_running_loop()
        if self._pool is None or self._loop is not loop:
            # Connections of another loop cannot be used here; start with empty slots.
            self._pool = asyncio.Queue()
            for _ in range(self.pool_size):
                self._pool.put_nowait(None)
            self._loop = loop
        return self._pool

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            timeout=self.timeout_s,
            use_tls=self.use_tls,
            start_tls=self.starttls,
            tls_context=self.tls_context,
        )
        await client.connect()
        try:
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()  # once per connection; _envelope sends raw commands
            if self.username:
                await client.login(self.username, self.password)
        except BaseException:
            client.close()  # do not leak the socket of a refused login
            raise
        self.connects += 1
        return client

    # -- sending ---------------------------------------------------------------------------------

    async def _envelope(self, client: aiosmtplib.SMTP, msg: OutgoingMessage) -> None:
        """MAIL FROM + RCPT TO; a refusal resets the transaction and is re-raised.

        Raw commands rather than ``client.mail``/``rcpt``: those re-parse both
        addresses with ``email.utils`` on every message (~20 us of the client's
        ~300 us per message); the sender is fixed and the recipient has passed
        ``_valid_address`` (no spaces, brackets or control characters).
        """
        options: tuple[bytes, ...] = ()
        address = msg.address.encode()
        if not msg.address.isascii():
            if not client.supports_extension("smtputf8"):
                raise aiosmtplib.SMTPRecipientRefused(555, "SMTPUTF8 not supported", "")
            options = (b"SMTPUTF8",)
        try:
            reply = await client.execute_command(b"MAIL", self._mail_from, *options)
            if reply.code != 250:
                raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, self.sender)
            reply = await client.execute_command(b"RCPT", b"TO:<" + address + b">")
            if reply.code not in (250, 251):
                raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, "")
        except aiosmtplib.SMTPResponseException:
            with contextlib.suppress(aiosmtplib.SMTPException):
                await client.rset()  # leave the connection clean for the next message
            raise

    def _refused(self, msg: OutgoingMessage, exc: aiosmtplib.SMTPResponseException) -> SendResult:
        sid = msg.subscriber_id
        stage = {
            aiosmtplib.SMTPRecipientRefused: "RCPT",
            aiosmtplib.SMTPSenderRefused: "MAIL",
            aiosmtplib.SMTPDataError: "DATA",
        }.get(type(exc), "SMTP")
        error = f"{stage} {exc.code}"
        if 400 <= exc.code < 500:
            return SendResult(sid, ok=False, error=error, retriable=True)
        if stage == "RCPT" and exc.code in _DEAD_MAILBOX:
            return SendResult(sid, ok=False, error=error, invalid_address=True)
        return SendResult(sid, ok=False, error=error)

    async def _send_on(
        self, client: aiosmtplib.SMTP | None, msg: OutgoingMessage
    ) -> tuple[SendResult, aiosmtplib.SMTP | None]:
        """One transaction on ``client`` (connecting first if needed): the result and
        the connection to go on with (``None`` once it broke)."""
        sid = msg.subscriber_id
        if not _valid_address(msg.address):
            return SendResult(
                sid, ok=False, error="malformed address", invalid_address=True
            ), client
        for attempt in range(2):
            reused = client is not None
            try:
                if client is None or not client.is_connected:
                    client = None
                    client = await self._connect()
                    reused = False
                await self._envelope(client, msg)
                break
            except aiosmtplib.SMTPAuthenticationError as exc:
                return SendResult(sid, ok=False, error=f"{_AUTH} ({exc.code})"), None
            except aiosmtplib.SMTPResponseException as exc:
                if isinstance(exc, _GREETING_ERRORS):
                    return _lost(sid, str(exc.code)), None
                return self._refused(msg, exc), client
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                if client is not None:
                    client.close()
                client = None
                # A pooled connection that died while idle fails on its first
                # command, before anything was accepted: retry once on a new one.
                if reused and attempt == 0:
                    continue
                return _lost(sid, type(exc).__name__), None
        assert client is not None
        try:
            await client.data(self.render(msg))
        except aiosmtplib.SMTPResponseException as exc:
            return self._refused(msg, exc), client
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            # Lost during DATA: maybe delivered, maybe not. Retriable; the stable
            # Message-ID lets mail systems and the citizen spot a duplicate.
            client.close()
            return _lost(sid, type(exc).__name__), None
        return SendResult(sid, ok=True, provider_message_id=self.message_id(msg)), client

    async def send_batch(
        self,
        messages: Sequence[OutgoingMessage],
        on_result: Callable[[SendResult], None] | None = None,
    ) -> list[SendResult]:
        """Send each message in its own SMTP transaction over the pool;
        ``on_result`` hears each result as soon as its transaction ends."""
        if not messages:
            return []
        pool = self._queue()
        queue = iter(messages)
        results: list[SendResult] = []

        async def worker() -> None:
            # A worker keeps its connection for every message it takes, so concurrent
            # batches finish one after another rather than all at once (see fcm.py).
            client = await pool.get()
            try:
                for msg in queue:
                    result, client = await self._send_on(client, msg)
                    results.append(result)
                    if on_result is not None:
                        on_result(result)
            finally:
                pool.put_nowait(client)

        await asyncio.gather(*(worker() for _ in range(min(len(messages), self.pool_size))))
        if all(r.error.startswith(_CONN) for r in results):
            raise ProviderError(f"{self.name}: SMTP server unreachable", retriable=True)
        if all(r.error.startswith(_AUTH) for r in results):
            raise ProviderError(f"{self.name}: authentication rejected", retriable=False)
        return results

    async def aclose(self) -> None:
        """QUIT every pooled connection of the running loop."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        same_loop = self._loop is asyncio.get_running_loop()
        while not pool.empty():
            client = pool.get_nowait()
            if client is None:
                continue
            if same_loop and client.is_connected:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.quit(), 2.0)
            client.close()
