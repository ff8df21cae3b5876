"""The command-signing scheme of CONTRACT.md: Ed25519 over the command object without `sig`,
serialised as JSON with sorted keys, separators (",", ":"), UTF-8, ensure_ascii=False."""

import base64
import hashlib
import json
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (Ed25519PrivateKey,
                                                               Ed25519PublicKey)

from gateway.model import GatewayError, RejectCode


class KeyError_(GatewayError, ValueError):
    """A key file that cannot be used (one line)."""


def canonical(command):
    body = {k: v for k, v in command.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def key_id(public_key):
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path):
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_public_key(f.read())
    except OSError as exc:
        raise KeyError_("%s: cannot read (%s)" % (path, exc.strerror)) from None
    except ValueError:
        raise KeyError_("%s: not a PEM public key" % path) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyError_("%s: not an Ed25519 key" % path)
    return key


def load_private_key(path):
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as exc:
        raise KeyError_("%s: cannot read (%s)" % (path, exc.strerror)) from None
    except (ValueError, TypeError) as exc:
        raise KeyError_("%s: not an unencrypted PEM private key (%s)" % (path, exc)) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyError_("%s: not an Ed25519 key" % path)
    return key


def sign(command, private_key):
    """The command with `sig` (and `kid`, the signing key's id) added."""
    command = dict(command)
    command.pop("sig", None)
    command.setdefault("kid", key_id(private_key.public_key()))
    command["sig"] = base64.b64encode(private_key.sign(canonical(command))).decode()
    return command


def check(command, public_keys):
    """(None, None) if a configured key signed the command, else (RejectCode, reason)."""
    sig = command.get("sig")
    if not isinstance(sig, str) or not sig:
        return RejectCode.MISSING_SIGNATURE, "missing signature"
    try:
        raw = base64.b64decode(sig, validate=True)
    except (ValueError, TypeError):
        return RejectCode.BAD_SIGNATURE, "bad signature (not base64)"
    kid = command.get("kid")
    keys = public_keys
    if kid is not None:
        keys = [k for k in public_keys if key_id(k) == kid]
        if not keys:
            return RejectCode.UNKNOWN_KEY, "unknown key %s" % ascii(kid)[:32]
    if not keys:
        return RejectCode.NO_KEYS, "no head-end keys configured"
    try:
        data = canonical(command)
    except (UnicodeEncodeError, TypeError, ValueError):
        # lone surrogates and the like: nothing a signer could have signed
        return RejectCode.BAD_SIGNATURE, "bad signature (not canonical JSON)"
    for k in keys:
        try:
            k.verify(raw, data)
            return None, None
        except InvalidSignature:
            continue
    return RejectCode.BAD_SIGNATURE, "bad signature"


def verify(command, public_keys):
    """None if a configured key signed the command, else the reason."""
    return check(command, public_keys)[1]


def generate(folder):
    """headend.key (private, mode 0600) and headend.pub in `folder`; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    priv = os.path.join(folder, "headend.key")
    pub = os.path.join(folder, "headend.pub")
    for path in (priv, pub):
        if os.path.exists(path):
            raise KeyError_("%s exists: refusing to overwrite a key" % path)
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(pub, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub, key_id(key.public_key())
