"""Ed25519 verification without the `cryptography` package in the service: OpenSSL's
libcrypto by ctypes must accept exactly what `cryptography` (the signing side) accepts."""

import base64
import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings, strategies as st

from gateway.control import signing

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PRIV = ed25519.Ed25519PrivateKey.generate()
RAW = PRIV.public_key().public_bytes(serialization.Encoding.Raw,
                                     serialization.PublicFormat.Raw)


def test_openssl_backend_is_found_here():
    assert signing.PublicKey(RAW).backend == "openssl"


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), flip=st.integers(0, 64 * 8 - 1),
       mutate=st.sampled_from(["none", "sig", "data", "short", "long"]))
def test_both_backends_agree_with_the_signer(data, flip, mutate):
    sig = PRIV.sign(data)
    if mutate == "sig":
        sig = bytearray(sig)
        sig[flip // 8] ^= 1 << (flip % 8)
        sig = bytes(sig)
    elif mutate == "data":
        data = data + b"x"
    elif mutate == "short":
        sig = sig[:63]
    elif mutate == "long":
        sig = sig + b"\0"
    openssl = signing.PublicKey(RAW, "openssl").verify(sig, data)
    fallback = signing.PublicKey(RAW, "cryptography").verify(sig, data)
    assert openssl == fallback == (mutate == "none")


def test_a_signature_of_another_key_is_refused():
    other = ed25519.Ed25519PrivateKey.generate()
    assert not signing.PublicKey(RAW).verify(other.sign(b"abc"), b"abc")
    assert signing.PublicKey(RAW).verify(PRIV.sign(b"abc"), b"abc")


def _pem(key):
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def test_public_key_files_are_read_strictly(tmp_path):
    cases = {
        "ok.pub": (_pem(PRIV), None),
        "rsa.pub": (_pem(rsa.generate_private_key(65537, 1024)), "not an Ed25519 key"),
        "ec.pub": (_pem(ec.generate_private_key(ec.SECP256R1())), "not an Ed25519 key"),
        "junk.pub": (b"hello", "not a PEM public key"),
        "badb64.pub": (b"-----BEGIN PUBLIC KEY-----\n@@@\n-----END PUBLIC KEY-----\n",
                       "not a PEM public key"),
        "private.pem": (PRIV.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()),
                        "not a PEM public key"),
    }
    for name, (body, why) in cases.items():
        path = tmp_path / name
        path.write_bytes(body)
        if why is None:
            assert signing.load_public_key(str(path)).raw == RAW
        else:
            with pytest.raises(signing.KeyError_) as err:
                signing.load_public_key(str(path))
            assert str(err.value) == "%s: %s" % (path, why)


def test_the_key_id_is_the_same_from_both_sides():
    assert signing.key_id(signing.PublicKey(RAW)) == signing.key_id(PRIV.public_key())


def test_the_service_verifies_commands_without_loading_cryptography(tmp_path):
    """`cryptography` is about 8 MB resident: the service's command path must not load it."""
    _, pub, _ = signing.generate(str(tmp_path / "k"))
    cmd = signing.sign({"v": 1, "id": "x", "meter": "m1", "action": "read"},
                       signing.load_private_key(str(tmp_path / "k" / "headend.key")))
    code = ("import sys, json\n"
            "import gateway.control.executor, gateway.service.gateway\n"
            "from gateway.control import signing\n"
            "k = signing.load_public_key(%r)\n"
            "assert signing.check(json.loads(%r), [k]) == (None, None)\n"
            "bad = json.loads(%r); bad['id'] = 'y'\n"
            "assert signing.check(bad, [k])[1] == 'bad signature'\n"
            "print(sorted(m for m in sys.modules if m.startswith('cryptography')))\n"
            % (pub, __import__("json").dumps(cmd), __import__("json").dumps(cmd)))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
