"""Loading token keys from configuration: the I/O side of :mod:`bridge.auth`.

``load_keyring`` reads every configured key (inline secret, secret file, PEM public key)
and the optional JWKS file into a :class:`~bridge.auth.KeyRing`; ``load_signing_key`` reads
the key ``market-bridge token`` signs with. Each key is checked against its algorithm
allowlist (RS*/PS* need RSA of at least 2048 bits, ES256/384/512 need EC P-256/384/521,
EdDSA needs Ed25519/Ed448, HS* need a secret at least as long as the hash). Every problem
is a :class:`~bridge.errors.ConfigError` naming ``auth.keys.<index>`` or ``auth.jwks_file``;
messages never quote key material.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, get_args

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from bridge.auth import KeyRing, SigningKey, VerificationKey
from bridge.config import HMAC_ALGORITHMS, AuthConfig, JwtAlgorithm, KeyConfig
from bridge.errors import ConfigError

__all__ = ["generate_dev_secret", "load_keyring", "load_signing_key"]

_SUPPORTED: frozenset[str] = frozenset(get_args(JwtAlgorithm))
# RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_RSA_MIN_BITS = 2048
_EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_JWK_REQUIRED = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x"), "oct": ("k",)}
_JWK_PRIVATE = ("d", "p", "q", "dp", "dq", "qi", "oth")
_DEV_SECRET_BYTES = 48

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
PrivateKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
)


def _describe(key: object) -> str:
    if isinstance(key, bytes):
        return f"{len(key)}-byte secret"
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"RSA-{key.key_size} key"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name} key"
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "Ed25519 key"
    if isinstance(key, ed448.Ed448PublicKey | ed448.Ed448PrivateKey):
        return "Ed448 key"
    return f"{type(key).__name__} key"


def _misfit(algorithm: str, key: object) -> str | None:
    """Why ``key`` (secret bytes or a public key) cannot verify ``algorithm``; None if it can."""
    if algorithm in HMAC_ALGORITHMS:
        if not isinstance(key, bytes):
            return f"{algorithm} needs a secret, not an {_describe(key)}"
        if len(key) < _HMAC_MIN_BYTES[algorithm]:
            return (
                f"{algorithm} needs a secret of at least {_HMAC_MIN_BYTES[algorithm]} bytes, got {len(key)}"
            )
        return None
    if algorithm[:2] in ("RS", "PS"):
        if not isinstance(key, rsa.RSAPublicKey):
            return f"{algorithm} needs an RSA key, not an {_describe(key)}"
        if key.key_size < _RSA_MIN_BITS:
            return f"{algorithm} needs an RSA key of at least {_RSA_MIN_BITS} bits, got {key.key_size}"
        return None
    if algorithm in _EC_CURVES:
        curve = _EC_CURVES[algorithm]
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, curve):
            return f"{algorithm} needs an EC {curve.name} key, not an {_describe(key)}"
        return None
    if algorithm == "EdDSA":
        if not isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            return f"EdDSA needs an Ed25519 or Ed448 key, not an {_describe(key)}"
        return None
    return f"algorithm {algorithm!r} is not supported"


def _check_fits(field: str, algorithms: Iterable[str], key: object) -> None:
    for algorithm in sorted(algorithms):
        if (problem := _misfit(algorithm, key)) is not None:
            raise ConfigError(field, problem)


def _read_bytes(field: str, what: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(field, f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _read_secret_file(field: str, path: Path) -> bytes:
    secret = _read_bytes(field, "secret_file", path).rstrip(b"\r\n")
    if not secret:
        raise ConfigError(field, f"secret_file {path} is empty")
    return secret


def _load_public_pem(field: str, path: Path) -> PublicKey:
    data = _read_bytes(field, "public_key_file", path)
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        hint = (
            " (it holds a private key: give the public half, e.g. `openssl pkey -pubout`)"
            if b"PRIVATE KEY-----" in data
            else ""
        )
        raise ConfigError(field, f"public_key_file {path} is not a PEM public key{hint}") from None
    if not isinstance(key, PublicKey):
        raise ConfigError(field, f"public_key_file {path} holds an unsupported {_describe(key)}")
    return key


def _verification_key(index: int, key_config: KeyConfig) -> VerificationKey:
    field = f"auth.keys.{index}"
    key: bytes | PublicKey
    if key_config.secret is not None:
        key = key_config.secret.get_secret_value().encode("utf-8")
    elif key_config.secret_file is not None:
        key = _read_secret_file(field, key_config.secret_file)
    elif key_config.public_key_file is not None:
        key = _load_public_pem(field, key_config.public_key_file)
    else:  # KeyConfig's validator makes this unreachable
        raise ConfigError(field, "give exactly one of secret, secret_file, public_key_file")
    _check_fits(field, key_config.algorithms, key)
    return VerificationKey(kid=key_config.kid, key=key, algorithms=frozenset(key_config.algorithms))


def _jwk_key(index: int, jwk: object) -> VerificationKey | None:
    """One JWKS member as a verification key; None for an encryption key ("use": "enc")."""
    field = "auth.jwks_file"
    if not isinstance(jwk, dict):
        raise ConfigError(field, f"key {index} is not a JSON object")
    kid = jwk.get("kid")
    name = f"key {index}" + (f" (kid {kid!r})" if isinstance(kid, str) else "")
    if kid is not None and not isinstance(kid, str):
        raise ConfigError(field, f"{name}: 'kid' must be a string")
    if jwk.get("use") == "enc":
        return None
    kty = jwk.get("kty")
    if kty not in _JWK_REQUIRED:
        raise ConfigError(field, f"{name}: 'kty' must be one of {sorted(_JWK_REQUIRED)}, got {kty!r}")
    missing = [member for member in _JWK_REQUIRED[kty] if member not in jwk]
    if missing:
        raise ConfigError(field, f"{name}: {kty} key lacks {', '.join(repr(m) for m in missing)}")
    if kty != "oct" and any(member in jwk for member in _JWK_PRIVATE):
        raise ConfigError(field, f"{name}: holds private key material; publish only public keys")
    alg = jwk.get("alg")
    if alg is not None and alg not in _SUPPORTED:
        raise ConfigError(field, f"{name}: alg {alg!r} is not supported (one of {sorted(_SUPPORTED)})")
    try:
        parsed = jwt.PyJWK(jwk)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        # PyJWT's messages quote the whole JWK, which for 'oct' is the secret: not repeated.
        raise ConfigError(field, f"{name}: not a valid {kty} key") from None
    algorithm = parsed.algorithm_name
    if algorithm not in _SUPPORTED:
        raise ConfigError(field, f"{name}: algorithm {algorithm!r} is not supported")
    key: Any = parsed.key
    _check_fits(f"{field} ({name})", [algorithm], key)
    return VerificationKey(kid=kid, key=key, algorithms=frozenset({algorithm}))


def _load_jwks(path: Path) -> list[VerificationKey]:
    field = "auth.jwks_file"
    data = _read_bytes(field, "jwks_file", path)
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(field, f"{path} is not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ConfigError(field, f"{path} must be a JSON object with a 'keys' list")
    keys = [key for index, jwk in enumerate(document["keys"]) if (key := _jwk_key(index, jwk)) is not None]
    if not keys:
        raise ConfigError(field, f"{path} holds no signature verification keys")
    return keys


def load_keyring(config: AuthConfig) -> KeyRing:
    """Every configured key, then the JWKS file's; kids must be unique across both."""
    keys = [_verification_key(index, key_config) for index, key_config in enumerate(config.keys)]
    if config.jwks_file is not None:
        seen = {key.kid for key in keys if key.kid is not None}
        for key in _load_jwks(config.jwks_file):
            if key.kid is not None and key.kid in seen:
                raise ConfigError("auth.jwks_file", f"kid {key.kid!r} is used by more than one key")
            if key.kid is not None:
                seen.add(key.kid)
            keys.append(key)
    return KeyRing(keys=tuple(keys))


def _public_bytes(key: PublicKey) -> bytes:
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def _signing_key(index: int, key_config: KeyConfig) -> SigningKey | None:
    field = f"auth.keys.{index}"
    algorithm = key_config.algorithms[0]
    if algorithm in HMAC_ALGORITHMS:
        verification = _verification_key(index, key_config)
        return SigningKey(kid=key_config.kid, key=verification.key, algorithm=algorithm)
    if key_config.private_key_file is None:
        return None
    path = key_config.private_key_file
    data = _read_bytes(field, "private_key_file", path)
    try:
        private = load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(field, f"private_key_file {path} is encrypted; give an unencrypted PEM") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(field, f"private_key_file {path} is not a PEM private key") from None
    if not isinstance(private, PrivateKey):
        raise ConfigError(field, f"private_key_file {path} holds an unsupported {_describe(private)}")
    public = private.public_key()
    _check_fits(field, key_config.algorithms, public)
    if key_config.public_key_file is not None:
        configured = _load_public_pem(field, key_config.public_key_file)
        if _public_bytes(configured) != _public_bytes(public):
            raise ConfigError(field, f"private_key_file {path} does not match public_key_file")
    return SigningKey(kid=key_config.kid, key=private, algorithm=algorithm)


def load_signing_key(config: AuthConfig, kid: str | None = None) -> SigningKey:
    """The key named ``kid``, or the first that can sign (a secret or a private_key_file).

    It signs with the key's first algorithm.
    """
    if kid is not None:
        for index, key_config in enumerate(config.keys):
            if key_config.kid == kid:
                signing = _signing_key(index, key_config)
                if signing is None:
                    raise ConfigError(
                        f"auth.keys.{index}", f"key {kid!r} cannot sign: it has no secret or private_key_file"
                    )
                return signing
        raise ConfigError("auth.keys", f"no key has kid {kid!r}")
    for index, key_config in enumerate(config.keys):
        if (signing := _signing_key(index, key_config)) is not None:
            return signing
    raise ConfigError("auth.keys", "no key can sign: give a secret, secret_file or private_key_file")


def generate_dev_secret(path: Path) -> None:
    """Write a fresh random secret (urlsafe text, 48 random bytes) to ``path`` with mode 0600.

    Parent directories are created; an existing file is replaced atomically.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(_DEV_SECRET_BYTES)
    # mkstemp creates the file 0600 from the start, so the secret is never readable by others.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secret + "\n")
        os.chmod(tmp_name, 0o600)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
