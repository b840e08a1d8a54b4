"""Bearer-token verification and minting, as a caller of the API experiences it.

JWKS tests serve real keys from a real HTTP server on 127.0.0.1 (or, for
failure modes, an ``httpx.MockTransport``) and inject the clock, so cache and
refetch behaviour is observed by counting requests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from kidp.auth import (
    SCOPE_DELETE,
    SCOPE_DEPLOY,
    SCOPE_READ,
    Caller,
    TokenVerifier,
    bearer_token,
    mint_token,
    parse_ttl,
)
from kidp.errors import AuthUnavailable, Forbidden, Unauthorized, ValidationFailed

SECRET = "unit-test-secret-NEVER-SHOW-" + "q" * 24
ISSUER = "kidp"
AUDIENCE = "kidp-broker"
T0 = 1_700_000_000.0


class FakeClock:
    """A settable clock (seconds since the epoch)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def hs_verifier(clock: FakeClock) -> TokenVerifier:
    return TokenVerifier(issuer=ISSUER, audience=AUDIENCE, hs_secret=SECRET, clock=clock)


def claims(**overrides: Any) -> dict[str, Any]:
    """A complete, valid claim set at T0; ``None`` values remove a claim."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "ci-job",
        "iat": int(T0),
        "exp": int(T0) + 3600,
        "scope": "deploy read",
        "namespaces": ["team-a"],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_token(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token built without PyJWT, which refuses to create the malicious ones."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = (
        b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{b64(signature)}"


def rejection(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises((Unauthorized, AuthUnavailable)) as info:
        verifier.verify(token)
    if info.value.message == "signing keys unavailable":
        # Keys that cannot be fetched are the identity provider's fault: retryable.
        assert isinstance(info.value, AuthUnavailable)
    return info.value.message


# --- HS256 -------------------------------------------------------------------


def test_valid_token_gives_caller_with_scopes_and_namespaces(hs_verifier: TokenVerifier) -> None:
    token = jwt.encode(claims(namespaces=["team-a", "team-b"]), SECRET, algorithm="HS256")

    caller = hs_verifier.verify(token)

    assert caller == Caller(
        subject="ci-job",
        scopes=frozenset({SCOPE_DEPLOY, SCOPE_READ}),
        namespaces=frozenset({"team-a", "team-b"}),
    )
    assert caller.may_access("team-b")
    assert not caller.may_access("team-c")
    caller.require_scope(SCOPE_DEPLOY)
    with pytest.raises(Forbidden, match="token lacks scope 'delete'"):
        caller.require_scope(SCOPE_DELETE)


def test_star_namespace_grants_every_namespace_and_missing_claims_grant_nothing(
    hs_verifier: TokenVerifier,
) -> None:
    star = hs_verifier.verify(jwt.encode(claims(namespaces=["*"]), SECRET, algorithm="HS256"))
    bare = hs_verifier.verify(
        jwt.encode(claims(namespaces=None, scope=None), SECRET, algorithm="HS256")
    )

    assert star.may_access("anything")
    assert bare.scopes == frozenset()
    assert bare.namespaces == frozenset()
    assert not bare.may_access("team-a")


def test_expiry_honours_leeway(hs_verifier: TokenVerifier, clock: FakeClock) -> None:
    token = jwt.encode(claims(exp=int(T0) + 60), SECRET, algorithm="HS256")

    clock.now = T0 + 60 + 29  # expired, but within the 30 s leeway
    assert hs_verifier.verify(token).subject == "ci-job"

    clock.now = T0 + 60 + 31
    assert rejection(hs_verifier, token) == "token expired"


def test_a_token_seen_before_skips_the_signature_check_but_not_its_expiry(
    hs_verifier: TokenVerifier, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = jwt.encode(claims(exp=int(T0) + 60), SECRET, algorithm="HS256")
    decodes: list[str] = []
    real = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: decodes.append("x") or real(*a, **k))
    for _ in range(3):
        assert hs_verifier.verify(token).subject == "ci-job"
    assert len(decodes) == 1
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert rejection(hs_verifier, forged) == "invalid token signature"  # another string
    clock.now = T0 + 60 + 31
    assert rejection(hs_verifier, token) == "token expired"


def test_token_from_the_future_is_refused(hs_verifier: TokenVerifier) -> None:
    early = jwt.encode(claims(nbf=int(T0) + 120), SECRET, algorithm="HS256")
    assert rejection(hs_verifier, early) == "token not yet valid"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"iss": "someone-else"}, "token issuer mismatch"),
        ({"iss": "kid"}, "token issuer mismatch"),  # a prefix is not a match
        ({"aud": "another-service"}, "token audience mismatch"),
        ({"sub": None}, "token lacks required claim 'sub'"),
        ({"exp": None}, "token lacks required claim 'exp'"),
        ({"iss": None}, "token lacks required claim 'iss'"),
        ({"aud": None}, "token lacks required claim 'aud'"),
        ({"sub": ""}, "invalid token subject"),
        ({"sub": 42}, "invalid token subject"),
        ({"exp": "tomorrow"}, "token claim 'exp' is not a number"),
        ({"exp": True}, "token claim 'exp' is not a number"),
        ({"scope": ["deploy"]}, "token claim 'scope' must be a space-separated string"),
        ({"namespaces": "team-a"}, "token claim 'namespaces' must be a list of strings"),
        ({"namespaces": ["team-a", 7]}, "token claim 'namespaces' must be a list of strings"),
    ],
)
def test_bad_claims_are_refused_with_a_reason(
    hs_verifier: TokenVerifier, overrides: dict[str, Any], reason: str
) -> None:
    token = jwt.encode(claims(**overrides), SECRET, algorithm="HS256")
    assert rejection(hs_verifier, token) == reason


def test_audience_list_containing_ours_is_accepted(hs_verifier: TokenVerifier) -> None:
    token = jwt.encode(claims(aud=["other", AUDIENCE]), SECRET, algorithm="HS256")
    assert hs_verifier.verify(token).subject == "ci-job"


def test_wrong_secret_is_an_invalid_signature(hs_verifier: TokenVerifier) -> None:
    token = jwt.encode(claims(), "another-secret-that-is-long-enough-123", algorithm="HS256")
    assert rejection(hs_verifier, token) == "invalid token signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_unsigned_token_is_refused(hs_verifier: TokenVerifier, alg: str) -> None:
    token = hand_made_token({"alg": alg, "typ": "JWT"}, claims(), key=None)
    assert rejection(hs_verifier, token) == "token algorithm not allowed"


def test_algorithm_outside_the_allow_list_is_refused(hs_verifier: TokenVerifier) -> None:
    token = jwt.encode(claims(), SECRET + "x" * 16, algorithm="HS512")
    assert rejection(hs_verifier, token) == "token algorithm not allowed"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "missing bearer token"),
        ("not-a-jwt", "malformed token"),
        ("a.b.c", "malformed token"),
        ("eyJhbGciOiJIUzI1NiJ9.!!!.sig", "malformed token"),
        ("x" * 20_000, "token too large"),
    ],
)
def test_garbage_is_refused(hs_verifier: TokenVerifier, token: str, reason: str) -> None:
    assert rejection(hs_verifier, token) == reason


def test_tampered_payload_is_refused(hs_verifier: TokenVerifier) -> None:
    header, _, signature = jwt.encode(claims(), SECRET, algorithm="HS256").split(".")
    forged = b64(json.dumps(claims(namespaces=["*"])).encode())
    assert rejection(hs_verifier, f"{header}.{forged}.{signature}") == "invalid token signature"


# --- construction -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "set KIDP_JWT_SECRET or KIDP_JWT_JWKS_URL"),
        (
            {"hs_secret": SECRET, "jwks_url": "https://idp.example/jwks"},
            "set only one of KIDP_JWT_SECRET and KIDP_JWT_JWKS_URL",
        ),
        ({"hs_secret": "short-secret"}, "KIDP_JWT_SECRET must be at least 32 bytes for HS256"),
        (
            {"hs_secret": SECRET, "algorithms": ["HS512"]},
            "KIDP_JWT_SECRET must be at least 64 bytes for HS512",
        ),
        ({"hs_secret": SECRET, "algorithms": ["HS256", "RS256"]}, "mixes HMAC"),
        ({"jwks_url": "https://idp.example/jwks", "algorithms": ["RS256", "HS256"]}, "mixes"),
        ({"jwks_url": "https://idp.example/jwks", "algorithms": ["HS256"]}, "cannot be used"),
        ({"hs_secret": SECRET, "algorithms": ["RS256"]}, "needs HMAC algorithms"),
        ({"hs_secret": SECRET, "algorithms": ["none"]}, "must not contain 'none'"),
        ({"jwks_url": "https://idp.example/jwks", "algorithms": ["None"]}, "'none'"),
        ({"hs_secret": SECRET, "algorithms": ["HS1"]}, "unsupported JWT algorithm 'HS1'"),
        ({"jwks_url": "http://idp.example/jwks"}, "KIDP_JWT_JWKS_URL must be an https:// URL"),
        ({"jwks_url": "file:///etc/jwks.json"}, "must be an https:// URL"),
    ],
)
def test_unsafe_configuration_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        TokenVerifier(issuer=ISSUER, audience=AUDIENCE, **kwargs)
    assert message in info.value.message


def test_short_secret_is_never_echoed() -> None:
    weak = "hunter2-weak-password"
    with pytest.raises(ValidationFailed) as info:
        TokenVerifier(issuer=ISSUER, audience=AUDIENCE, hs_secret=weak)
    assert weak not in str(info.value)
    assert weak not in repr(info.value)


def test_default_algorithms_follow_the_key_source() -> None:
    hs = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, hs_secret=SECRET)
    pk = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_url="https://idp.example/jwks")
    assert hs.algorithms == ("HS256",)
    assert pk.algorithms == ("RS256", "ES256")


# --- minting ------------------------------------------------------------------


def test_minted_token_round_trips(hs_verifier: TokenVerifier, clock: FakeClock) -> None:
    token = mint_token(
        secret=SECRET,
        subject="alice",
        scopes=["deploy", "read", "delete"],
        namespaces=["team-a"],
        ttl_seconds=parse_ttl("1h"),
        issuer=ISSUER,
        audience=AUDIENCE,
        now=T0,
    )

    caller = hs_verifier.verify(token)

    assert caller.subject == "alice"
    assert caller.scopes == {SCOPE_DEPLOY, SCOPE_READ, SCOPE_DELETE}
    assert caller.namespaces == {"team-a"}
    clock.now = T0 + 3600 + 31
    assert rejection(hs_verifier, token) == "token expired"


def test_minted_token_uses_hs256_with_the_documented_claims() -> None:
    token = mint_token(
        secret=SECRET,
        subject="alice",
        scopes=["read"],
        namespaces=["b", "a"],
        ttl_seconds=90,
        issuer=ISSUER,
        audience=AUDIENCE,
        now=T0,
    )
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    payload = jwt.decode(
        token, SECRET, algorithms=["HS256"], audience=AUDIENCE, options={"verify_exp": False}
    )
    assert payload["exp"] - payload["iat"] == 90
    assert payload["scope"] == "read"
    assert payload["namespaces"] == ["a", "b"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"secret": "too-short"}, "at least 32 bytes"),
        ({"scopes": ["deploy", "admin"]}, "unknown scope 'admin'"),
        ({"ttl_seconds": 0}, "TTL must be positive"),
        ({"subject": " "}, "subject must not be empty"),
        ({"namespaces": ["team a"]}, "namespaces must be non-empty"),
    ],
)
def test_mint_refuses_bad_input(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {
        "secret": SECRET,
        "subject": "alice",
        "scopes": ["deploy"],
        "namespaces": ["team-a"],
        "ttl_seconds": 60,
        "issuer": ISSUER,
        "audience": AUDIENCE,
    }
    arguments.update(kwargs)
    with pytest.raises(ValidationFailed, match=message) as info:
        mint_token(**arguments)
    assert "too-short" not in info.value.message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("1h", 3600), ("7d", 604800), ("3600", 3600), (" 2H ", 7200)],
)
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0h", "1w", "-5m", "1.5h", "h", "1h30m", "ten"])
def test_parse_ttl_refuses_other_text(text: str) -> None:
    with pytest.raises(ValidationFailed):
        parse_ttl(text)


# --- Authorization header ----------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["Bearer abc.def.ghi", "bearer abc.def.ghi", "Bearer  abc.def.ghi "]
)
def test_bearer_token_extracts_the_token(value: str) -> None:
    assert bearer_token(value) == "abc.def.ghi"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "missing bearer token"),
        ("", "missing bearer token"),
        ("Basic dXNlcjpwYXNz", "missing bearer token"),
        ("Bearer", "malformed Authorization header"),
        ("Bearer   ", "malformed Authorization header"),
        ("Bearer a b", "malformed Authorization header"),
    ],
)
def test_bearer_token_refusals(value: str | None, reason: str) -> None:
    with pytest.raises(Unauthorized) as info:
        bearer_token(value)
    assert info.value.message == reason
    assert info.value.http_status == 401


# --- no secret or token in any message ---------------------------------------------


def test_error_messages_never_contain_the_secret_or_the_token(
    hs_verifier: TokenVerifier, clock: FakeClock
) -> None:
    good = jwt.encode(claims(), SECRET, algorithm="HS256")
    candidates = [
        jwt.encode(claims(aud="x"), SECRET, algorithm="HS256"),
        jwt.encode(claims(iss="x"), SECRET, algorithm="HS256"),
        jwt.encode(claims(exp=int(T0) - 3600), SECRET, algorithm="HS256"),
        jwt.encode(claims(sub=None), SECRET, algorithm="HS256"),
        jwt.encode(claims(), SECRET[::-1], algorithm="HS256"),
        hand_made_token({"alg": "none"}, claims(), key=None),
        good[:-4] + "AAAA",
        good.replace(".", "", 1),
    ]
    messages = []
    for token in candidates:
        with pytest.raises(Unauthorized) as info:
            hs_verifier.verify(token)
        messages.append((token, info.value))
    for token, error in messages:
        for text in (str(error), repr(error), json.dumps(error.to_body())):
            assert SECRET not in text
            assert SECRET[::-1] not in text
            assert token not in text
            assert len(text) < 200


# --- JWKS ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key_2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str | None, **extra: Any) -> dict[str, Any]:
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update({"use": "sig", "alg": "RS256", **extra})
    if kid is not None:
        jwk["kid"] = kid
    return jwk


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update({"kid": kid, "use": "sig", "alg": "ES256", **extra})
    return jwk


def sign(key: Any, alg: str, kid: str | None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers=headers)


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 that counts the requests it answers."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.requests = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer._lock:
                    outer.requests += 1
                    body = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, *keys: Any) -> None:
        with self._lock:
            self.document = {"keys": list(keys)}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


@pytest.fixture
def jwks_verifier(jwks_server: JwksServer, clock: FakeClock) -> TokenVerifier:
    return TokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_url=jwks_server.url, clock=clock)


def test_jwks_verifies_rs256_and_es256_and_caches(
    jwks_server: JwksServer,
    jwks_verifier: TokenVerifier,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    jwks_server.serve(rsa_jwk(rsa_key, "rsa-1"), ec_jwk(ec_key, "ec-1"))
    rs_token = sign(rsa_key, "RS256", "rsa-1", sub="rs-caller")
    es_token = sign(ec_key, "ES256", "ec-1", sub="es-caller")

    for _ in range(10):
        assert jwks_verifier.verify(rs_token).subject == "rs-caller"
        assert jwks_verifier.verify(es_token).subject == "es-caller"

    assert jwks_server.requests == 1


def test_unknown_kid_refetches_at_most_once_per_window(
    jwks_server: JwksServer,
    jwks_verifier: TokenVerifier,
    clock: FakeClock,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_2: rsa.RSAPrivateKey,
) -> None:
    jwks_server.serve(rsa_jwk(rsa_key, "rsa-1"))
    jwks_verifier.verify(sign(rsa_key, "RS256", "rsa-1"))
    assert jwks_server.requests == 1

    clock.advance(31)
    assert rejection(jwks_verifier, sign(rsa_key_2, "RS256", "nope")) == "unknown signing key"
    assert jwks_server.requests == 2

    # A flood of random kids inside the next 30 s must not become a flood of fetches.
    for i in range(50):
        clock.advance(0.5)
        token = sign(rsa_key_2, "RS256", f"random-{i}")
        assert rejection(jwks_verifier, token) == "unknown signing key"
    assert jwks_server.requests == 2
    # Known keys keep working meanwhile, from the cache.
    assert jwks_verifier.verify(sign(rsa_key, "RS256", "rsa-1")).subject == "ci-job"
    assert jwks_server.requests == 2


def test_key_rotation_is_picked_up_after_the_window(
    jwks_server: JwksServer,
    jwks_verifier: TokenVerifier,
    clock: FakeClock,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_2: rsa.RSAPrivateKey,
) -> None:
    old_token = sign(rsa_key, "RS256", "2024")
    new_token = sign(rsa_key_2, "RS256", "2025")
    jwks_server.serve(rsa_jwk(rsa_key, "2024"))
    jwks_verifier.verify(old_token)

    jwks_server.serve(rsa_jwk(rsa_key_2, "2025"))  # the provider rotates
    clock.advance(10)
    assert rejection(jwks_verifier, new_token) == "unknown signing key"  # within the window
    assert jwks_server.requests == 1

    clock.advance(21)
    assert jwks_verifier.verify(new_token).subject == "ci-job"
    assert jwks_server.requests == 2
    # The withdrawn key is gone from the cache with the refetch.
    clock.advance(31)
    assert rejection(jwks_verifier, old_token) == "unknown signing key"


def test_cached_keys_are_refetched_after_their_maximum_age(
    jwks_server: JwksServer, clock: FakeClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        jwks_url=jwks_server.url,
        clock=clock,
        jwks_max_age_seconds=600,
    )
    jwks_server.serve(rsa_jwk(rsa_key, "k"))
    token = sign(rsa_key, "RS256", "k", exp=int(T0) + 7200)
    verifier.verify(token)
    clock.advance(599)
    verifier.verify(token)
    assert jwks_server.requests == 1

    jwks_server.serve()  # the provider withdrew the key
    clock.advance(2)
    assert rejection(verifier, token) == "unknown signing key"
    assert jwks_server.requests == 2


def test_token_without_kid_uses_the_only_key(
    jwks_server: JwksServer,
    jwks_verifier: TokenVerifier,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    jwks_server.serve(rsa_jwk(rsa_key, None))
    assert jwks_verifier.verify(sign(rsa_key, "RS256", None)).subject == "ci-job"


def test_token_without_kid_is_refused_when_the_key_is_ambiguous(
    jwks_server: JwksServer,
    jwks_verifier: TokenVerifier,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_2: rsa.RSAPrivateKey,
) -> None:
    jwks_server.serve(rsa_jwk(rsa_key, "a"), rsa_jwk(rsa_key_2, "b"))
    assert rejection(jwks_verifier, sign(rsa_key, "RS256", None)) == "token has no key id (kid)"


def test_hs_rs_key_confusion_is_refused_before_any_key_is_fetched(
    jwks_server: JwksServer, jwks_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks_server.serve(rsa_jwk(rsa_key, "rsa-1"))
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = hand_made_token({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(), public_pem)

    assert rejection(jwks_verifier, forged) == "token algorithm not allowed"
    assert jwks_server.requests == 0


def test_algorithm_must_match_the_selected_key(
    jwks_server: JwksServer,
    jwks_verifier: TokenVerifier,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    jwks_server.serve(rsa_jwk(rsa_key, "rsa-1"), ec_jwk(ec_key, "ec-1"))
    token = sign(ec_key, "ES256", "rsa-1")
    assert rejection(jwks_verifier, token) == "token algorithm does not match its signing key"


def test_signature_by_another_key_is_refused(
    jwks_server: JwksServer,
    jwks_verifier: TokenVerifier,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_2: rsa.RSAPrivateKey,
) -> None:
    jwks_server.serve(rsa_jwk(rsa_key, "rsa-1"))
    assert rejection(jwks_verifier, sign(rsa_key_2, "RS256", "rsa-1")) == "invalid token signature"


def test_unfit_keys_in_the_jwks_are_ignored(
    jwks_server: JwksServer,
    jwks_verifier: TokenVerifier,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    private_jwk = json.loads(RSAAlgorithm.to_jwk(rsa_key))
    private_jwk.update({"kid": "private", "alg": "RS256"})
    p384_jwk = ECAlgorithm.to_jwk(p384.public_key(), as_dict=True)
    p384_jwk.update({"kid": "p384", "alg": "ES256"})  # wrong curve for ES256
    jwks_server.serve(
        {"kty": "oct", "kid": "shared", "k": b64(SECRET.encode()), "alg": "HS256"},
        private_jwk,
        rsa_jwk(rsa_key, "rs512", alg="RS512"),
        rsa_jwk(rsa_key, "enc", use="enc"),
        p384_jwk,
        {"kty": "RSA", "kid": "broken", "n": "AAAA"},
        "not-a-key",
    )

    for kid, key, alg in [
        ("private", rsa_key, "RS256"),
        ("enc", rsa_key, "RS256"),
        ("rs512", rsa_key, "RS256"),
        ("p384", ec_key, "ES256"),
    ]:
        assert rejection(jwks_verifier, sign(key, alg, kid)) == "unknown signing key"
    # The HMAC "key" in the set can never be used: HS256 is not allowed at all.
    hs_token = hand_made_token({"alg": "HS256", "kid": "shared"}, claims(), SECRET.encode())
    assert rejection(jwks_verifier, hs_token) == "token algorithm not allowed"


class CountingTransport(httpx.MockTransport):
    """A JWKS endpoint whose answer the test switches; counts requests."""

    def __init__(self) -> None:
        self.requests = 0
        self.response: httpx.Response = httpx.Response(500)
        self._lock = threading.Lock()
        super().__init__(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests += 1
        return self.response


@pytest.fixture
def transport() -> CountingTransport:
    return CountingTransport()


@pytest.fixture
def mocked_verifier(transport: CountingTransport, clock: FakeClock) -> TokenVerifier:
    return TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        jwks_url="https://idp.example/.well-known/jwks.json",
        http_client=httpx.Client(transport=transport),
        clock=clock,
    )


@pytest.mark.parametrize(
    "failure",
    [
        httpx.Response(500),
        httpx.Response(200, text="<html>oops</html>"),
        httpx.Response(200, json={"no": "keys"}),
        httpx.Response(302, headers={"Location": "http://evil.example/jwks"}),
        httpx.Response(200, content=b"x" * (1024 * 1024 + 1)),
    ],
)
def test_unreachable_or_broken_jwks_refuses_tokens_and_is_not_hammered(
    transport: CountingTransport,
    mocked_verifier: TokenVerifier,
    clock: FakeClock,
    rsa_key: rsa.RSAPrivateKey,
    failure: httpx.Response,
) -> None:
    transport.response = failure
    token = sign(rsa_key, "RS256", "rsa-1")
    for _ in range(20):
        assert rejection(mocked_verifier, token) == "signing keys unavailable"
    assert transport.requests == 1

    transport.response = httpx.Response(200, json={"keys": [rsa_jwk(rsa_key, "rsa-1")]})
    clock.advance(30)
    assert mocked_verifier.verify(token).subject == "ci-job"
    assert transport.requests == 2


def test_network_error_is_reported_without_details(
    clock: FakeClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused to secret-host", request=request)

    verifier = TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        jwks_url="https://idp.example/jwks",
        http_client=httpx.Client(transport=httpx.MockTransport(refuse)),
        clock=clock,
    )
    assert rejection(verifier, sign(rsa_key, "RS256", "k")) == "signing keys unavailable"


def test_failed_refresh_keeps_the_keys_already_known(
    transport: CountingTransport,
    mocked_verifier: TokenVerifier,
    clock: FakeClock,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_2: rsa.RSAPrivateKey,
) -> None:
    transport.response = httpx.Response(200, json={"keys": [rsa_jwk(rsa_key, "rsa-1")]})
    token = sign(rsa_key, "RS256", "rsa-1")
    mocked_verifier.verify(token)

    transport.response = httpx.Response(503)
    clock.advance(31)
    assert rejection(mocked_verifier, sign(rsa_key_2, "RS256", "new")) == "unknown signing key"
    assert mocked_verifier.verify(token).subject == "ci-job"
    assert transport.requests == 2


def test_concurrent_unknown_kids_cause_a_single_fetch(
    transport: CountingTransport,
    mocked_verifier: TokenVerifier,
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    transport.response = httpx.Response(200, json={"keys": [rsa_jwk(rsa_key, "rsa-1")]})
    tokens = [sign(rsa_key, "RS256", f"kid-{i}") for i in range(32)]
    barrier = threading.Barrier(len(tokens))
    reasons: list[str] = []

    def attempt(token: str) -> None:
        barrier.wait()
        try:
            mocked_verifier.verify(token)
        except Unauthorized as exc:
            reasons.append(exc.message)

    threads = [threading.Thread(target=attempt, args=(t,)) for t in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert reasons == ["unknown signing key"] * len(tokens)
    assert transport.requests == 1


def test_clock_set_back_does_not_freeze_the_key_cache(
    jwks_server: JwksServer,
    jwks_verifier: TokenVerifier,
    clock: FakeClock,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_2: rsa.RSAPrivateKey,
) -> None:
    jwks_server.serve(rsa_jwk(rsa_key, "old"))
    jwks_verifier.verify(sign(rsa_key, "RS256", "old"))
    jwks_server.serve(rsa_jwk(rsa_key_2, "new"))

    clock.advance(-3600)  # an NTP correction, say
    token = sign(rsa_key_2, "RS256", "new", iat=int(clock.now), exp=int(clock.now) + 60)

    assert jwks_verifier.verify(token).subject == "ci-job"
    assert jwks_server.requests == 2


def test_default_wall_clock_accepts_a_fresh_token() -> None:
    verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, hs_secret=SECRET)
    token = mint_token(
        secret=SECRET,
        subject="now",
        scopes=["read"],
        namespaces=["*"],
        ttl_seconds=60,
        issuer=ISSUER,
        audience=AUDIENCE,
    )
    assert verifier.verify(token).may_access("any")


def test_a_token_checked_against_keys_withdrawn_meanwhile_is_not_remembered_as_good(
    jwks_server: JwksServer,
    jwks_verifier: TokenVerifier,
    clock: FakeClock,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_2: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = sign(rsa_key, "RS256", "2024")
    jwks_server.serve(rsa_jwk(rsa_key, "2024"))
    real = jwt.decode

    def decode_while_another_request_refreshes(*args: Any, **kwargs: Any) -> Any:
        claims = real(*args, **kwargs)
        # Another request's thread fetches the keys meanwhile: 2024 is withdrawn.
        jwks_server.serve(rsa_jwk(rsa_key_2, "2025"))
        clock.advance(31)
        jwks_verifier._refresh(stale=jwks_verifier._keyset)
        return claims

    monkeypatch.setattr(jwt, "decode", decode_while_another_request_refreshes)
    jwks_verifier.verify(old)  # valid when it was checked
    monkeypatch.setattr(jwt, "decode", real)
    assert rejection(jwks_verifier, old) == "unknown signing key"
