"""Bearer-token authentication: verify JWTs (RFC 8725) and mint development tokens.

The broker accepts one kind of credential, a JWT in ``Authorization: Bearer``.
Two key sources exist and exactly one is configured:

* ``KIDP_JWT_SECRET``: a shared HMAC secret (HS256 by default). ``kidp-broker
  token`` mints tokens with it, so a development setup needs nothing else.
* ``KIDP_JWT_JWKS_URL``: the identity provider's public keys (RS256/ES256 by
  default), fetched over HTTPS and cached by ``kid``.

The accepted algorithms come from configuration, never from the token
(RFC 8725 section 3.1), and symmetric and asymmetric algorithms are never mixed,
which rules out the HS/RS key-confusion attack by construction.

Every failure raises :class:`~kidp.errors.Unauthorized` with a short reason that
is safe to return to the caller: it names what was wrong, never a key or token.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jwt
from jwt.exceptions import InvalidSubjectError

from kidp.callers import (
    KNOWN_SCOPES,
    SCOPE_DELETE,
    SCOPE_DEPLOY,
    SCOPE_READ,
    Caller,
)
from kidp.errors import AuthUnavailable, Unauthorized, ValidationFailed

if TYPE_CHECKING:
    import httpx

__all__ = [
    "SCOPE_DELETE",
    "SCOPE_DEPLOY",
    "SCOPE_READ",
    "Caller",
    "TokenVerifier",
    "bearer_token",
    "mint_token",
    "parse_ttl",
]

log = logging.getLogger(__name__)


# HMAC algorithms and the shortest secret each accepts: RFC 7518 section 3.2
# asks for a key at least as long as the hash output.
_HMAC_MIN_BYTES: Mapping[str, int] = {"HS256": 32, "HS384": 48, "HS512": 64}

# Asymmetric algorithms and the JWK key type ("kty") that can carry their key.
_ASYMMETRIC_KTY: Mapping[str, str] = {
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "PS384": "RSA",
    "PS512": "RSA",
    "ES256": "EC",
    "ES384": "EC",
    "ES512": "EC",
}

# RFC 7518 section 3.4 binds each ECDSA algorithm to one curve; a P-384 key
# must not verify an "ES256" token.
_EC_CURVE: Mapping[str, str] = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}

_DEFAULT_HS_ALGORITHMS = ("HS256",)
_DEFAULT_JWKS_ALGORITHMS = ("RS256", "ES256")

# Real access tokens are a few KiB; refusing larger input bounds the work an
# unauthenticated request can cause before any signature is checked.
_MAX_TOKEN_CHARS = 16 * 1024
#: Verified tokens remembered (least recently used ones are forgotten first).
_VERIFIED_TOKENS = 1024
_MAX_JWKS_BYTES = 1024 * 1024
_JWKS_TIMEOUT_SECONDS = 5.0
# Plain http would let anyone on the path substitute the signing keys; only a
# JWKS served on this machine (tests, sidecars) may skip TLS.
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

_REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]
_TTL_UNITS: Mapping[str, int] = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_TTL_PATTERN = re.compile(r"(\d+)([smhd]?)")


@dataclass(frozen=True)
class _KeySet:
    """One fetched JWKS, reduced to the keys this verifier may use."""

    by_kid: Mapping[str, jwt.PyJWK]
    keys: tuple[jwt.PyJWK, ...]
    fetched_at: float


@dataclass(frozen=True)
class _Verified:
    """A token whose signature and claims were checked against ``keyset``."""

    keyset: object | None
    claims: Mapping[str, Any]
    caller: Caller


class TokenVerifier:
    """Verifies bearer JWTs against one issuer, one audience and one key source.

    Thread-safe: one instance serves every request of the process.
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        hs_secret: str | None = None,
        jwks_url: str | None = None,
        algorithms: Sequence[str] = (),
        leeway_seconds: int = 30,
        http_client: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        jwks_refetch_seconds: float = 30.0,
        jwks_max_age_seconds: float = 3600.0,
    ) -> None:
        """Check the configuration; raise :class:`ValidationFailed` if it is unsafe.

        ``clock`` (seconds since the epoch) decides expiry and JWKS cache age.
        ``jwks_refetch_seconds`` is the shortest gap between two JWKS fetches
        (an unknown ``kid`` triggers at most one per gap); ``jwks_max_age_seconds``
        is how long fetched keys are trusted before they are fetched again, so a
        key the provider withdrew stops working.
        """
        if not issuer or not audience:
            raise ValidationFailed("KIDP_JWT_ISSUER and KIDP_JWT_AUDIENCE must not be empty")
        if hs_secret and jwks_url:
            raise ValidationFailed("set only one of KIDP_JWT_SECRET and KIDP_JWT_JWKS_URL")
        if not hs_secret and not jwks_url:
            raise ValidationFailed("set KIDP_JWT_SECRET or KIDP_JWT_JWKS_URL")
        if leeway_seconds < 0:
            raise ValidationFailed("KIDP_JWT_LEEWAY_SECONDS must not be negative")
        if jwks_refetch_seconds < 0 or jwks_max_age_seconds <= 0:
            raise ValidationFailed("JWKS refetch interval must be >= 0 and cache age > 0")

        chosen = tuple(algorithms) or (
            _DEFAULT_HS_ALGORITHMS if hs_secret else _DEFAULT_JWKS_ALGORITHMS
        )
        _check_algorithms(chosen, symmetric=bool(hs_secret))

        self._issuer = issuer
        self._audience = audience
        self._algorithms: tuple[str, ...] = chosen
        self._leeway = float(leeway_seconds)
        self._clock = clock
        self._hs_key: bytes | None = None
        self._jwks_url: str | None = None
        if hs_secret:
            for algorithm in chosen:
                _check_hs_secret(hs_secret, algorithm)
            self._hs_key = hs_secret.encode()
        else:
            assert jwks_url is not None  # guaranteed by the checks above
            _check_jwks_url(jwks_url)
            self._jwks_url = jwks_url
        self._http = http_client
        self._refetch_seconds = float(jwks_refetch_seconds)
        self._max_age = float(jwks_max_age_seconds)
        self._allowed_kty = frozenset(_ASYMMETRIC_KTY[a] for a in chosen if a in _ASYMMETRIC_KTY)
        # Readers use the current snapshot without locking; only fetching is
        # serialised, so a slow identity provider never blocks known-key tokens
        # and concurrent unknown-kid tokens cause a single fetch.
        self._keyset: _KeySet | None = None
        self._last_fetch_attempt: float | None = None
        self._fetch_lock = threading.Lock()
        # Tokens already verified (a caller sends the same one with every
        # request): the signature check is skipped, the time claims are not.
        self._verified: OrderedDict[str, _Verified] = OrderedDict()
        self._verified_lock = threading.Lock()

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms this verifier accepts, fixed at construction."""
        return self._algorithms

    def verify(self, token: str) -> Caller:
        """Verify ``token`` and return its :class:`Caller`; raise :class:`Unauthorized`."""
        if not token:
            raise Unauthorized("missing bearer token")
        if len(token) > _MAX_TOKEN_CHARS:
            raise Unauthorized("token too large")
        known = self._known(token)
        if known is not None:
            self._check_times(known.claims)
            return known.caller
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed token") from None
        algorithm = header.get("alg")
        # Checked before any key is looked up, so a forged header can neither
        # pick the algorithm nor trigger a JWKS fetch.
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise Unauthorized("token algorithm not allowed")

        key: Any
        used: _KeySet | None = None
        if self._hs_key is not None:
            key = self._hs_key
        else:
            jwk, used = self._jwks_key(header.get("kid"))
            if jwk.algorithm_name != algorithm:
                raise Unauthorized("token algorithm does not match its signing key")
            key = jwk.key

        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(self._algorithms),
                issuer=self._issuer,
                audience=self._audience,
                options={
                    "require": list(_REQUIRED_CLAIMS),
                    # Time claims (with the leeway) are checked below against the
                    # injected clock; PyJWT would read the wall clock directly.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(_reason(exc)) from None
        self._check_times(claims)
        caller = _caller_from(claims)
        # Remembered with the keys it was checked against: a refresh since
        # (a withdrawn key) makes it prove itself again.
        self._remember(token, _Verified(used, claims, caller))
        return caller

    def _known(self, token: str) -> _Verified | None:
        """A token verified before, with the keys still current (a JWKS refresh
        makes every token prove itself again against the keys now served)."""
        keyset = self._keyset
        if self._hs_key is None and (
            keyset is None or not _within(self._clock() - keyset.fetched_at, self._max_age)
        ):
            return None  # the keys are due for a fetch: verify against what is served
        with self._verified_lock:
            known = self._verified.get(token)
            if known is None or known.keyset is not keyset:
                return None
            self._verified.move_to_end(token)
            return known

    def _remember(self, token: str, verified: _Verified) -> None:
        with self._verified_lock:
            self._verified[token] = verified
            while len(self._verified) > _VERIFIED_TOKENS:
                self._verified.popitem(last=False)

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        expires = _numeric_date(claims, "exp")
        if expires is not None and expires <= now - self._leeway:
            raise Unauthorized("token expired")
        for claim in ("nbf", "iat"):
            moment = _numeric_date(claims, claim)
            if moment is not None and moment > now + self._leeway:
                raise Unauthorized("token not yet valid")

    # JWKS

    def _jwks_key(self, kid: Any) -> tuple[jwt.PyJWK, _KeySet]:
        """The key for ``kid`` and the key set it came from."""
        keyset = self._keyset
        if keyset is None or not _within(self._clock() - keyset.fetched_at, self._max_age):
            keyset = self._refresh(stale=keyset)
        found = _select(keyset, kid)
        if found is None and keyset is not None:
            # The provider may have rotated in a key we have not seen yet.
            keyset = self._refresh(stale=keyset)
            found = _select(keyset, kid)
        if found is not None:
            assert keyset is not None  # a key was found in it
            return found, keyset
        if keyset is None:
            # The identity provider is down: a 503 to retry, not a 401 blaming the token.
            raise AuthUnavailable(
                "signing keys unavailable", retry_after=max(1.0, self._refetch_seconds)
            )
        if kid is None:
            raise Unauthorized("token has no key id (kid)")
        raise Unauthorized("unknown signing key")

    def _refresh(self, *, stale: _KeySet | None) -> _KeySet | None:
        """Fetch the JWKS unless another thread just did or the last attempt was
        too recent; return the newest key set either way."""
        with self._fetch_lock:
            if self._keyset is not stale:
                return self._keyset
            now = self._clock()
            if self._last_fetch_attempt is not None and _within(
                now - self._last_fetch_attempt, self._refetch_seconds
            ):
                return self._keyset
            # Failed attempts count too: an unreachable provider is asked once
            # per interval, not once per request.
            self._last_fetch_attempt = now
            fetched = self._fetch(now)
            if fetched is not None:
                self._keyset = fetched
            return self._keyset

    def _fetch(self, now: float) -> _KeySet | None:
        # Imported here: only a JWKS-configured broker fetches keys, and the
        # HTTP client is a large part of the API function's cold start.
        import httpx

        assert self._jwks_url is not None
        host = urlsplit(self._jwks_url).hostname
        try:
            if self._http is not None:
                response = self._http.get(
                    self._jwks_url, timeout=_JWKS_TIMEOUT_SECONDS, follow_redirects=False
                )
            else:
                with httpx.Client(timeout=_JWKS_TIMEOUT_SECONDS) as client:
                    response = client.get(self._jwks_url, follow_redirects=False)
        except httpx.HTTPError as exc:
            log.warning("JWKS fetch from %s failed: %s", host, type(exc).__name__)
            return None
        if response.status_code != httpx.codes.OK:
            log.warning("JWKS fetch from %s answered HTTP %s", host, response.status_code)
            return None
        if len(response.content) > _MAX_JWKS_BYTES:
            log.warning("JWKS from %s is larger than %d bytes", host, _MAX_JWKS_BYTES)
            return None
        try:
            document = response.json()
        except ValueError:
            log.warning("JWKS from %s is not JSON", host)
            return None
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            log.warning("JWKS from %s has no 'keys' list", host)
            return None
        return self._keyset_from(entries, now)

    def _keyset_from(self, entries: list[Any], now: float) -> _KeySet:
        keys: list[jwt.PyJWK] = []
        by_kid: dict[str, jwt.PyJWK] = {}
        for entry in entries:
            jwk = self._usable_key(entry)
            if jwk is None:
                continue
            keys.append(jwk)
            kid = entry.get("kid")
            if isinstance(kid, str) and kid not in by_kid:
                by_kid[kid] = jwk
        log.info("loaded %d JWKS signing key(s)", len(keys))
        return _KeySet(by_kid=by_kid, keys=tuple(keys), fetched_at=now)

    def _usable_key(self, entry: Any) -> jwt.PyJWK | None:
        """The verification key ``entry`` describes, or None if this verifier
        must not use it (wrong type or algorithm, not for signatures, private)."""
        if not isinstance(entry, dict):
            return None
        kty = entry.get("kty")
        if kty not in self._allowed_kty or entry.get("use", "sig") != "sig":
            return None
        if "d" in entry:
            # A published private key is compromised by definition.
            log.error("JWKS publishes a private key (kid %r); ignoring it", entry.get("kid"))
            return None
        declared = entry.get("alg")
        if declared is not None and declared not in self._algorithms:
            return None
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            log.warning("ignoring unusable JWKS key (kid %r)", entry.get("kid"))
            return None
        name = jwk.algorithm_name
        if name not in self._algorithms or _ASYMMETRIC_KTY.get(name) != kty:
            return None
        if kty == "EC" and entry.get("crv") != _EC_CURVE.get(name):
            return None
        return jwk


def _within(elapsed: float, interval: float) -> bool:
    # A wall clock can be set back; a negative elapsed time must not freeze the
    # cache (or the refetch throttle) until the clock catches up again.
    return 0 <= elapsed < interval


def _select(keyset: _KeySet | None, kid: Any) -> jwt.PyJWK | None:
    if keyset is None:
        return None
    if kid is None:
        # Without a kid the choice is only unambiguous with a single key.
        return keyset.keys[0] if len(keyset.keys) == 1 else None
    return keyset.by_kid.get(kid)


def _check_algorithms(algorithms: Sequence[str], *, symmetric: bool) -> None:
    for algorithm in algorithms:
        if algorithm.lower() == "none":
            raise ValidationFailed("KIDP_JWT_ALGORITHMS must not contain 'none'")
        if algorithm not in _HMAC_MIN_BYTES and algorithm not in _ASYMMETRIC_KTY:
            supported = ", ".join([*_HMAC_MIN_BYTES, *_ASYMMETRIC_KTY])
            raise ValidationFailed(
                f"unsupported JWT algorithm '{algorithm}' in KIDP_JWT_ALGORITHMS "
                f"(supported: {supported})"
            )
    hmac = [a for a in algorithms if a in _HMAC_MIN_BYTES]
    if hmac and len(hmac) != len(algorithms):
        raise ValidationFailed(
            "KIDP_JWT_ALGORITHMS mixes HMAC (HS*) with public-key algorithms; choose one kind"
        )
    if symmetric and not hmac:
        raise ValidationFailed("KIDP_JWT_SECRET needs HMAC algorithms (HS256, HS384, HS512)")
    if not symmetric and hmac:
        raise ValidationFailed("KIDP_JWT_JWKS_URL cannot be used with HMAC (HS*) algorithms")


def _check_hs_secret(secret: str, algorithm: str) -> None:
    minimum = _HMAC_MIN_BYTES[algorithm]
    if len(secret.encode()) < minimum:
        # The message states the rule only: echoing even a weak secret would
        # put it into logs and error responses.
        raise ValidationFailed(f"KIDP_JWT_SECRET must be at least {minimum} bytes for {algorithm}")


def _check_jwks_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS:
        return
    raise ValidationFailed("KIDP_JWT_JWKS_URL must be an https:// URL")


def _reason(exc: jwt.PyJWTError) -> str:
    """A short, caller-safe description of why PyJWT refused a token."""
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token lacks required claim '{exc.claim}'"
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "token audience mismatch"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "token issuer mismatch"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "invalid token signature"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "token algorithm not allowed"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not yet valid"
    if isinstance(exc, InvalidSubjectError):
        return "invalid token subject"
    if isinstance(exc, jwt.DecodeError):
        return "malformed token"
    return "invalid token"


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # bool is an int subclass; "exp": true is malformed, not 1970-01-01T00:00:01.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Unauthorized(f"token claim '{name}' is not a number")
    return float(value)


def _caller_from(claims: Mapping[str, Any]) -> Caller:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject.strip():
        raise Unauthorized("invalid token subject")
    scope = claims.get("scope")
    if scope is None:
        scope = ""
    if not isinstance(scope, str):
        raise Unauthorized("token claim 'scope' must be a space-separated string")
    namespaces = claims.get("namespaces")
    if namespaces is None:
        namespaces = []
    if not isinstance(namespaces, list) or not all(isinstance(n, str) for n in namespaces):
        raise Unauthorized("token claim 'namespaces' must be a list of strings")
    return Caller(
        subject=subject,
        scopes=frozenset(scope.split()),
        namespaces=frozenset(n for n in namespaces if n),
    )


def mint_token(
    *,
    secret: str,
    subject: str,
    scopes: Iterable[str],
    namespaces: Iterable[str],
    ttl_seconds: int,
    issuer: str,
    audience: str,
    now: float | None = None,
) -> str:
    """Sign an HS256 token that :meth:`TokenVerifier.verify` accepts.

    This is what ``kidp-broker token`` prints. Raises :class:`ValidationFailed`
    for a short secret, an unknown scope, a blank namespace or a non-positive TTL.
    """
    _check_hs_secret(secret, "HS256")
    if not subject.strip():
        raise ValidationFailed("token subject must not be empty")
    if ttl_seconds <= 0:
        raise ValidationFailed("token TTL must be positive")
    scope_set = set(scopes)
    unknown = sorted(scope_set - KNOWN_SCOPES)
    if unknown:
        raise ValidationFailed(
            f"unknown scope '{unknown[0]}' (known: {', '.join(sorted(KNOWN_SCOPES))})"
        )
    namespace_list = sorted(set(namespaces))
    if any(not n or any(c.isspace() for c in n) for n in namespace_list):
        raise ValidationFailed("namespaces must be non-empty and contain no whitespace")
    issued = int(time.time() if now is None else now)
    payload = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl_seconds,
        "jti": uuid.uuid4().hex,
        "scope": " ".join(sorted(scope_set)),
        "namespaces": namespace_list,
    }
    return jwt.encode(payload, secret.encode(), algorithm="HS256")


def parse_ttl(text: str) -> int:
    """Seconds in ``text``: ``"90s"``, ``"30m"``, ``"1h"``, ``"7d"`` or plain ``"3600"``."""
    match = _TTL_PATTERN.fullmatch(text.strip().lower())
    if match is None:
        raise ValidationFailed(
            f"invalid TTL '{text[:32]}': use a number with s, m, h or d (e.g. 90s, 30m, 1h, 7d)"
        )
    seconds = int(match.group(1)) * _TTL_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValidationFailed("TTL must be positive")
    return seconds


def bearer_token(authorization_header: str | None) -> str:
    """The token in an ``Authorization: Bearer <token>`` header value.

    Raises ``Unauthorized("missing bearer token")`` when there is none (absent
    header or another scheme) and ``Unauthorized("malformed Authorization
    header")`` when the Bearer value is not exactly one token.
    """
    if authorization_header is None or not authorization_header.strip():
        raise Unauthorized("missing bearer token")
    scheme, _, rest = authorization_header.strip().partition(" ")
    # RFC 7235: the scheme name is case-insensitive.
    if scheme.lower() != "bearer":
        raise Unauthorized("missing bearer token")
    token = rest.strip()
    if not token or any(character.isspace() for character in token):
        raise Unauthorized("malformed Authorization header")
    return token
