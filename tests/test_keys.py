"""bridge.keys: key files into a KeyRing, signing keys, the dev secret; every mistake a ConfigError."""

from __future__ import annotations

import datetime as dt
import json
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, generate_private_key
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm

from bridge.auth import Claims, SigningKey, TokenPolicy, decide_auth, mint_token
from bridge.config import AuthConfig, KeyConfig
from bridge.errors import ConfigError
from bridge.keys import generate_dev_secret, load_keyring, load_signing_key

NOW = 1_700_000_000.0
SECRET = "k" * 32
LONG_SECRET = "s" * 64

PrivateKey = RSAPrivateKey | EllipticCurvePrivateKey | Ed25519PrivateKey | Ed448PrivateKey


@dataclass(frozen=True)
class Keys:
    rsa: RSAPrivateKey
    other_rsa: RSAPrivateKey
    small_rsa: RSAPrivateKey
    p256: EllipticCurvePrivateKey
    p384: EllipticCurvePrivateKey
    ed25519: Ed25519PrivateKey
    ed448: Ed448PrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=generate_private_key(public_exponent=65537, key_size=2048),
        other_rsa=generate_private_key(public_exponent=65537, key_size=2048),
        small_rsa=generate_private_key(public_exponent=65537, key_size=1024),
        p256=ec.generate_private_key(ec.SECP256R1()),
        p384=ec.generate_private_key(ec.SECP384R1()),
        ed25519=Ed25519PrivateKey.generate(),
        ed448=Ed448PrivateKey.generate(),
    )


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def private_pem(key: PrivateKey, password: bytes | None = None) -> bytes:
    encryption = BestAvailableEncryption(password) if password else NoEncryption()
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def auth(*keys: KeyConfig, jwks_file: Path | None = None) -> AuthConfig:
    return AuthConfig(keys=list(keys), jwks_file=jwks_file)


def token_ok(config: AuthConfig, signing: SigningKey, policy: TokenPolicy | None = None) -> bool:
    token = mint_token(signing, sub="alice", role="subscriber", now=NOW, ttl_s=60)
    result = decide_auth(token, "alice", NOW, load_keyring(config), policy or TokenPolicy())
    return isinstance(result, Claims)


# --------------------------------------------------------------------------- load_keyring: good keys


def test_inline_secret() -> None:
    ring = load_keyring(auth(KeyConfig(kid="a", algorithms=["HS256", "HS384"], secret=SECRET * 2)))
    (key,) = ring.keys
    assert key.kid == "a"
    assert key.key == (SECRET * 2).encode()
    assert key.algorithms == frozenset({"HS256", "HS384"})


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (SECRET + "\n", SECRET),
        (SECRET + "\r\n", SECRET),
        (SECRET, SECRET),
        (" " + SECRET + " \n", " " + SECRET + " "),  # only the line ending is stripped
        ("é" * 16 + "\n", "é" * 16),  # 32 UTF-8 bytes
    ],
)
def test_secret_file(tmp_path: Path, content: str, expected: str) -> None:
    path = write(tmp_path / "secret", content)
    ring = load_keyring(auth(KeyConfig(algorithms=["HS256"], secret_file=path)))
    assert ring.keys[0].key == expected.encode()
    assert ring.keys[0].kid is None


@pytest.mark.parametrize(
    ("attr", "algorithms"),
    [
        ("rsa", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]),
        ("p256", ["ES256"]),
        ("p384", ["ES384"]),
        ("ed25519", ["EdDSA"]),
        ("ed448", ["EdDSA"]),
    ],
)
def test_pem_public_key_files(tmp_path: Path, keys: Keys, attr: str, algorithms: list[str]) -> None:
    private: PrivateKey = getattr(keys, attr)
    config = auth(
        KeyConfig(
            kid=attr,
            algorithms=algorithms,
            public_key_file=write(tmp_path / "pub.pem", public_pem(private)),
            private_key_file=write(tmp_path / "key.pem", private_pem(private)),
        )
    )
    ring = load_keyring(config)
    assert ring.keys[0].algorithms == frozenset(algorithms)
    assert public_pem(private) == ring.keys[0].key.public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    signing = load_signing_key(config)
    assert signing.algorithm == algorithms[0]
    assert signing.kid == attr
    assert token_ok(config, signing)


def test_certificate_pem_is_accepted_as_public_key(tmp_path: Path, keys: Keys) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(keys.rsa.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=1))
        .sign(keys.rsa, hashes.SHA256())
    )
    path = write(tmp_path / "cert.pem", certificate.public_bytes(Encoding.PEM))
    config = auth(KeyConfig(algorithms=["RS256"], public_key_file=path))
    assert token_ok(config, SigningKey(None, keys.rsa, "RS256"))


def jwks(keys: Keys) -> list[dict[str, Any]]:
    rsa_jwk = RSAAlgorithm.to_jwk(keys.rsa.public_key(), as_dict=True)
    p256 = ECAlgorithm.to_jwk(keys.p256.public_key(), as_dict=True)
    p384 = ECAlgorithm.to_jwk(keys.p384.public_key(), as_dict=True)
    ed = OKPAlgorithm.to_jwk(keys.ed25519.public_key(), as_dict=True)
    oct_jwk = HMACAlgorithm.to_jwk(LONG_SECRET.encode(), as_dict=True)
    encryption = RSAAlgorithm.to_jwk(keys.other_rsa.public_key(), as_dict=True)
    return [
        {**rsa_jwk, "kid": "rsa", "use": "sig"},  # no alg: RS256 by key type
        {**p256, "kid": "p256"},  # no alg: ES256 by curve
        {**p384, "kid": "p384", "alg": "ES384"},
        {**ed, "kid": "ed"},  # OKP: EdDSA
        {**oct_jwk, "kid": "oct"},  # oct: HS256
        {**encryption, "kid": "enc", "use": "enc", "alg": "RSA-OAEP"},  # skipped
    ]


def test_jwks_file_with_mixed_keys(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path / "jwks.json", json.dumps({"keys": jwks(keys)}))
    config = auth(KeyConfig(kid="local", algorithms=["HS512"], secret=LONG_SECRET), jwks_file=path)
    ring = load_keyring(config)
    assert {key.kid: key.algorithms for key in ring.keys} == {
        "local": frozenset({"HS512"}),
        "rsa": frozenset({"RS256"}),
        "p256": frozenset({"ES256"}),
        "p384": frozenset({"ES384"}),
        "ed": frozenset({"EdDSA"}),
        "oct": frozenset({"HS256"}),
    }
    cases: list[tuple[str, Any, str]] = [
        ("local", LONG_SECRET.encode(), "HS512"),
        ("rsa", keys.rsa, "RS256"),
        ("p256", keys.p256, "ES256"),
        ("p384", keys.p384, "ES384"),
        ("ed", keys.ed25519, "EdDSA"),
        ("oct", LONG_SECRET.encode(), "HS256"),
    ]
    for kid, private, algorithm in cases:
        assert token_ok(config, SigningKey(kid, private, algorithm)), kid
    # A key the ring holds under another kid, or an encryption key, verifies nothing.
    assert not token_ok(config, SigningKey("rsa", keys.other_rsa, "RS256"))
    assert not token_ok(config, SigningKey("enc", keys.other_rsa, "RS256"))


def test_jwks_only_config(tmp_path: Path, keys: Keys) -> None:
    rsa_jwk = RSAAlgorithm.to_jwk(keys.rsa.public_key(), as_dict=True)
    path = write(tmp_path / "jwks.json", json.dumps({"keys": [rsa_jwk]}))
    config = auth(jwks_file=path)
    assert token_ok(config, SigningKey(None, keys.rsa, "RS256"))  # lone key, no kid


# --------------------------------------------------------------------------- load_keyring: mistakes

KeyFactory = Callable[[Path, Keys], KeyConfig]


def _pub(attr: str, algorithms: list[str]) -> KeyFactory:
    def make(tmp_path: Path, keys: Keys) -> KeyConfig:
        path = write(tmp_path / f"{attr}.pem", public_pem(getattr(keys, attr)))
        return KeyConfig(algorithms=algorithms, public_key_file=path)

    return make


def _file(content: bytes, algorithms: list[str], *, secret: bool = False) -> KeyFactory:
    def make(tmp_path: Path, keys: Keys) -> KeyConfig:
        path = write(tmp_path / "file", content)
        if secret:
            return KeyConfig(algorithms=algorithms, secret_file=path)
        return KeyConfig(algorithms=algorithms, public_key_file=path)

    return make


def _private_as_public(tmp_path: Path, keys: Keys) -> KeyConfig:
    return KeyConfig(algorithms=["RS256"], public_key_file=write(tmp_path / "k.pem", private_pem(keys.rsa)))


def _deleted_secret_file(tmp_path: Path, keys: Keys) -> KeyConfig:
    path = write(tmp_path / "gone", SECRET)
    config = KeyConfig(algorithms=["HS256"], secret_file=path)
    path.unlink()
    return config


@pytest.mark.parametrize(
    ("make_key", "message"),
    [
        pytest.param(
            _pub("rsa", ["ES256"]), "ES256 needs an EC secp256r1 key, not an RSA-2048 key", id="rsa-es256"
        ),
        pytest.param(_pub("p256", ["RS256"]), "RS256 needs an RSA key", id="ec-rs256"),
        pytest.param(_pub("p256", ["PS256"]), "PS256 needs an RSA key", id="ec-ps256"),
        pytest.param(_pub("p384", ["ES256"]), "not an EC secp384r1 key", id="p384-es256"),
        pytest.param(_pub("p256", ["ES256", "ES384"]), "ES384 needs an EC secp384r1 key", id="p256-es384"),
        pytest.param(_pub("ed25519", ["RS256"]), "not an Ed25519 key", id="ed25519-rs256"),
        pytest.param(_pub("rsa", ["EdDSA"]), "EdDSA needs an Ed25519 or Ed448 key", id="rsa-eddsa"),
        pytest.param(_pub("small_rsa", ["RS256"]), "at least 2048 bits, got 1024", id="rsa-1024"),
        pytest.param(_file(b"garbage", ["RS256"]), "is not a PEM public key", id="garbage-pem"),
        pytest.param(_file(b"", ["ES256"]), "is not a PEM public key", id="empty-pem"),
        pytest.param(_private_as_public, "it holds a private key", id="private-as-public"),
        pytest.param(_file(b"\n", ["HS256"], secret=True), "is empty", id="empty-secret-file"),
        pytest.param(_file(b"x" * 31, ["HS256"], secret=True), "at least 32 bytes, got 31", id="short-hs256"),
        pytest.param(_file(b"x" * 40, ["HS384"], secret=True), "at least 48 bytes, got 40", id="short-hs384"),
        pytest.param(_file(b"x" * 63, ["HS512"], secret=True), "at least 64 bytes, got 63", id="short-hs512"),
        pytest.param(
            lambda tmp_path, keys: KeyConfig(algorithms=["HS512"], secret=SECRET),
            "at least 64 bytes",
            id="inline-hs512",
        ),
        pytest.param(_deleted_secret_file, "cannot read secret_file", id="unreadable-secret"),
    ],
)
def test_key_mistakes_name_the_key(tmp_path: Path, keys: Keys, make_key: KeyFactory, message: str) -> None:
    good = KeyConfig(kid="good", algorithms=["HS256"], secret=SECRET)
    bad = make_key(tmp_path, keys)
    with pytest.raises(ConfigError) as caught:
        load_keyring(auth(good, bad))
    assert caught.value.field == "auth.keys.1"
    assert message in caught.value.message
    assert caught.value.source is None


def _rsa_jwk(keys: Keys, **extra: Any) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(keys.rsa.public_key(), as_dict=True), **extra}


def _drop(jwk: dict[str, Any], member: str) -> dict[str, Any]:
    return {name: value for name, value in jwk.items() if name != member}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        pytest.param(lambda k: "not json {", "is not JSON", id="not-json"),
        pytest.param(lambda k: [], "must be a JSON object with a 'keys' list", id="top-list"),
        pytest.param(lambda k: {"nokeys": []}, "'keys' list", id="no-keys"),
        pytest.param(lambda k: {"keys": {}}, "'keys' list", id="keys-object"),
        pytest.param(lambda k: {"keys": []}, "holds no signature verification keys", id="empty"),
        pytest.param(
            lambda k: {"keys": [_rsa_jwk(k, use="enc")]}, "no signature verification keys", id="only-enc"
        ),
        pytest.param(lambda k: {"keys": ["x"]}, "key 0 is not a JSON object", id="member-string"),
        pytest.param(
            lambda k: {"keys": [_drop(_rsa_jwk(k), "kty")]}, "key 0: 'kty' must be one of", id="no-kty"
        ),
        pytest.param(lambda k: {"keys": [_rsa_jwk(k, kty="XYZ")]}, "'kty' must be one of", id="bad-kty"),
        pytest.param(lambda k: {"keys": [_drop(_rsa_jwk(k), "n")]}, "RSA key lacks 'n'", id="rsa-no-n"),
        pytest.param(
            lambda k: {"keys": [_rsa_jwk(k), {"kty": "EC", "x": "AA", "y": "AA", "kid": "e"}]},
            "key 1 (kid 'e'): EC key lacks 'crv'",
            id="ec-no-crv",
        ),
        pytest.param(lambda k: {"keys": [{"kty": "oct"}]}, "oct key lacks 'k'", id="oct-no-k"),
        pytest.param(lambda k: {"keys": [_rsa_jwk(k, kid=7)]}, "'kid' must be a string", id="kid-int"),
        pytest.param(
            lambda k: {"keys": [_rsa_jwk(k, alg="ES256K")]}, "alg 'ES256K' is not supported", id="es256k"
        ),
        pytest.param(
            lambda k: {"keys": [_rsa_jwk(k, alg="none")]}, "alg 'none' is not supported", id="alg-none"
        ),
        pytest.param(
            lambda k: {"keys": [_rsa_jwk(k, alg="ES256")]}, "not a valid RSA key", id="rsa-as-es256"
        ),
        pytest.param(lambda k: {"keys": [_rsa_jwk(k, n="!!")]}, "not a valid RSA key", id="rsa-bad-n"),
        pytest.param(
            lambda k: {"keys": [{**RSAAlgorithm.to_jwk(k.rsa, as_dict=True)}]},
            "holds private key material",
            id="rsa-private",
        ),
        pytest.param(
            lambda k: {"keys": [HMACAlgorithm.to_jwk(b"short-secret-value", as_dict=True)]},
            "HS256 needs a secret of at least 32 bytes",
            id="oct-short",
        ),
        pytest.param(
            lambda k: {"keys": [_rsa_jwk(k, kid="good")]},
            "kid 'good' is used by more than one key",
            id="dup-kid",
        ),
        pytest.param(
            lambda k: {"keys": [{**RSAAlgorithm.to_jwk(k.small_rsa.public_key(), as_dict=True)}]},
            "at least 2048 bits",
            id="rsa-1024",
        ),
    ],
)
def test_jwks_mistakes_name_the_file(
    tmp_path: Path, keys: Keys, document: Callable[[Keys], Any], message: str
) -> None:
    value = document(keys)
    path = write(tmp_path / "jwks.json", value if isinstance(value, str) else json.dumps(value))
    good = KeyConfig(kid="good", algorithms=["HS256"], secret=SECRET)
    with pytest.raises(ConfigError) as caught:
        load_keyring(auth(good, jwks_file=path))
    assert caught.value.field.startswith("auth.jwks_file")
    assert message in caught.value.message, caught.value.message


def test_jwks_errors_never_quote_the_secret(tmp_path: Path) -> None:
    secret = "top-secret-" + "z" * 40
    jwk = {**HMACAlgorithm.to_jwk(secret.encode(), as_dict=True), "alg": "ES256"}  # oct with an EC alg
    path = write(tmp_path / "jwks.json", json.dumps({"keys": [jwk]}))
    with pytest.raises(ConfigError) as caught:
        load_keyring(auth(jwks_file=path))
    assert jwk["k"] not in str(caught.value)
    assert "top-secret" not in str(caught.value)


# --------------------------------------------------------------------------- load_signing_key


def test_signing_key_hmac_inline_and_file(tmp_path: Path) -> None:
    path = write(tmp_path / "secret", LONG_SECRET + "\n")
    config = auth(
        KeyConfig(kid="rsa-only", algorithms=["RS256"], public_key_file=write(tmp_path / "x", b"unused")),
        KeyConfig(kid="inline", algorithms=["HS384", "HS256"], secret=LONG_SECRET),
        KeyConfig(kid="file", algorithms=["HS512"], secret_file=path),
    )
    # The first key cannot sign (no private key), so the default is the next one.
    assert load_signing_key(config) == SigningKey("inline", LONG_SECRET.encode(), "HS384")
    assert load_signing_key(config, "file") == SigningKey("file", LONG_SECRET.encode(), "HS512")


def test_signing_key_rsa(tmp_path: Path, keys: Keys) -> None:
    config = auth(
        KeyConfig(
            kid="rsa",
            algorithms=["PS256", "RS256"],
            public_key_file=write(tmp_path / "pub.pem", public_pem(keys.rsa)),
            private_key_file=write(tmp_path / "key.pem", private_pem(keys.rsa)),
        )
    )
    signing = load_signing_key(config, "rsa")
    assert signing.algorithm == "PS256"
    assert isinstance(signing.key, RSAPrivateKey)
    assert signing.key.private_numbers() == keys.rsa.private_numbers()
    assert token_ok(config, signing)


def _rsa_config(tmp_path: Path, keys: Keys, private: bytes, algorithms: list[str] | None = None) -> KeyConfig:
    return KeyConfig(
        kid="rsa",
        algorithms=algorithms or ["RS256"],
        public_key_file=write(tmp_path / "pub.pem", public_pem(keys.rsa)),
        private_key_file=write(tmp_path / "key.pem", private),
    )


@pytest.mark.parametrize(
    ("make_config", "kid", "field", "message"),
    [
        pytest.param(
            lambda p, k: auth(_rsa_config(p, k, private_pem(k.other_rsa))),
            None,
            "auth.keys.0",
            "does not match public_key_file",
            id="mismatched-pair",
        ),
        pytest.param(
            lambda p, k: auth(_rsa_config(p, k, private_pem(k.rsa, b"pass"))),
            None,
            "auth.keys.0",
            "is encrypted",
            id="encrypted",
        ),
        pytest.param(
            lambda p, k: auth(_rsa_config(p, k, b"garbage")),
            None,
            "auth.keys.0",
            "is not a PEM private key",
            id="garbage",
        ),
        pytest.param(
            lambda p, k: auth(_rsa_config(p, k, private_pem(k.p256))),
            None,
            "auth.keys.0",
            "RS256 needs an RSA key",
            id="ec-private-for-rs256",
        ),
        pytest.param(
            lambda p, k: auth(
                KeyConfig(
                    kid="pub", algorithms=["ES256"], public_key_file=write(p / "p.pem", public_pem(k.p256))
                )
            ),
            None,
            "auth.keys",
            "no key can sign",
            id="no-signer",
        ),
        pytest.param(
            lambda p, k: auth(
                KeyConfig(
                    kid="pub", algorithms=["ES256"], public_key_file=write(p / "p.pem", public_pem(k.p256))
                )
            ),
            "pub",
            "auth.keys.0",
            "key 'pub' cannot sign",
            id="named-no-signer",
        ),
        pytest.param(
            lambda p, k: auth(KeyConfig(kid="a", algorithms=["HS256"], secret=SECRET)),
            "b",
            "auth.keys",
            "no key has kid 'b'",
            id="unknown-kid",
        ),
        pytest.param(
            lambda p, k: auth(KeyConfig(kid="a", algorithms=["HS512"], secret=SECRET)),
            "a",
            "auth.keys.0",
            "at least 64 bytes",
            id="short-hs512",
        ),
    ],
)
def test_signing_key_mistakes(
    tmp_path: Path,
    keys: Keys,
    make_config: Callable[[Path, Keys], AuthConfig],
    kid: str | None,
    field: str,
    message: str,
) -> None:
    config = make_config(tmp_path, keys)
    with pytest.raises(ConfigError) as caught:
        load_signing_key(config, kid)
    assert caught.value.field == field
    assert message in caught.value.message, caught.value.message


# --------------------------------------------------------------------------- generate_dev_secret


def test_generate_dev_secret(tmp_path: Path) -> None:
    path = tmp_path / "var" / "deep" / "dev-jwt.secret"
    generate_dev_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_text()
    assert first.endswith("\n")
    assert len(first.strip()) == 64  # 48 random bytes, base64url
    assert set(first.strip()) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    # Loadable as a secret_file, and a second call replaces it (still 0600).
    path.chmod(0o644)
    generate_dev_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() != first
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    config = auth(KeyConfig(kid="dev", algorithms=["HS256"], secret_file=path))
    assert load_keyring(config).keys[0].key == path.read_bytes().rstrip(b"\n")
    assert token_ok(config, load_signing_key(config, "dev"))
