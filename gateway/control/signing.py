"""The command-signing scheme of CONTRACT.md: Ed25519 over the command object without `sig`,
serialised as JSON with sorted keys, separators (",", ":"), UTF-8, ensure_ascii=False."""

import base64
import hashlib
import json
import os

import threading

from gateway.model import GatewayError, RejectCode

# An Ed25519 SubjectPublicKeyInfo (RFC 8410 section 4) is this DER prefix and the 32-byte key.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_NID_ED25519 = 1087                   # EVP_PKEY_ED25519 in OpenSSL 1.1.1 and 3.x


class KeyError_(GatewayError, ValueError):
    """A key file that cannot be used (one line)."""


def canonical(command):
    body = {k: v for k, v in command.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


class _OpenSSL:
    """Ed25519 verification through the libcrypto this Python's hashlib already loaded, by
    ctypes: the service verifies commands without importing the `cryptography` package,
    which costs about 8 MB resident (a third of the gateway) for one function."""
    _lock = threading.Lock()
    _lib = None

    @classmethod
    def lib(cls):
        with cls._lock:
            if cls._lib is None:
                cls._lib = cls._load() or False
            return cls._lib or None

    @staticmethod
    def _load():
        import ctypes
        import ctypes.util
        candidates = []
        try:
            import _hashlib                    # dlsym through it finds its libcrypto
            candidates.append(_hashlib.__file__)
        except (ImportError, AttributeError):
            pass
        candidates.append(ctypes.util.find_library("crypto"))
        for name in candidates:
            if not name:
                continue
            try:
                lib = ctypes.CDLL(name)
                f = lib.EVP_PKEY_new_raw_public_key
                f.restype, f.argtypes = ctypes.c_void_p, [
                    ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
                lib.EVP_MD_CTX_new.restype = ctypes.c_void_p
                lib.EVP_MD_CTX_new.argtypes = []
                lib.EVP_MD_CTX_free.argtypes = [ctypes.c_void_p]
                lib.EVP_MD_CTX_free.restype = None
                lib.EVP_PKEY_free.argtypes = [ctypes.c_void_p]
                lib.EVP_PKEY_free.restype = None
                lib.EVP_DigestVerifyInit.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                                     ctypes.c_void_p, ctypes.c_void_p,
                                                     ctypes.c_void_p]
                lib.EVP_DigestVerifyInit.restype = ctypes.c_int
                lib.EVP_DigestVerify.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                                 ctypes.c_size_t, ctypes.c_char_p,
                                                 ctypes.c_size_t]
                lib.EVP_DigestVerify.restype = ctypes.c_int
                lib.ERR_clear_error.argtypes = []
                lib.ERR_clear_error.restype = None
                return lib
            except (OSError, AttributeError):
                continue
        return None


class PublicKey:
    """A head-end's Ed25519 public key: `raw` (32 bytes) and `verify(sig, data) -> bool`.
    OpenSSL's libcrypto verifies when it is there (it is wherever Python has hashlib and
    ssl), else the `cryptography` package does: both are OpenSSL's Ed25519 (RFC 8032, a
    non-canonical S refused)."""

    def __init__(self, raw, backend=None):
        if len(raw) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        self.raw = bytes(raw)
        self._lib = _OpenSSL.lib() if backend in (None, "openssl") else None
        if backend == "openssl" and self._lib is None:
            raise KeyError_("libcrypto with Ed25519 not found")
        self._pkey = None
        self._fallback = None
        if self._lib is not None:
            self._pkey = self._lib.EVP_PKEY_new_raw_public_key(_NID_ED25519, None,
                                                               self.raw, 32)
            if not self._pkey:
                self._lib.ERR_clear_error()
                self._lib = None
        if self._lib is None:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
            self._fallback = Ed25519PublicKey.from_public_bytes(self.raw)

    @property
    def backend(self):
        return "openssl" if self._lib is not None else "cryptography"

    def verify(self, sig, data):
        if self._lib is None:
            from cryptography.exceptions import InvalidSignature
            try:
                self._fallback.verify(sig, data)
                return True
            except InvalidSignature:
                return False
        lib = self._lib
        ctx = lib.EVP_MD_CTX_new()
        if not ctx:
            raise MemoryError("EVP_MD_CTX_new")
        try:
            if lib.EVP_DigestVerifyInit(ctx, None, None, None, self._pkey) != 1:
                return False
            return lib.EVP_DigestVerify(ctx, bytes(sig), len(sig), bytes(data),
                                        len(data)) == 1
        finally:
            lib.EVP_MD_CTX_free(ctx)
            lib.ERR_clear_error()     # a failed check leaves errors the ssl module would see

    def __del__(self):
        if self._pkey and self._lib is not None:
            self._lib.EVP_PKEY_free(self._pkey)
            self._pkey = None


def key_id(public_key):
    raw = getattr(public_key, "raw", None)
    if raw is None:                     # a `cryptography` key (the CLI's signing side)
        from cryptography.hazmat.primitives import serialization
        raw = public_key.public_bytes(serialization.Encoding.Raw,
                                      serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def parse_public_pem(data):
    """The 32 raw bytes of a PEM Ed25519 public key (SubjectPublicKeyInfo), or ValueError
    with the reason: 'not a PEM public key' or 'not an Ed25519 key'."""
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    begin, end = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
    a, b = text.find(begin), text.find(end)
    if a < 0 or b < a:
        raise ValueError("not a PEM public key")
    try:
        der = base64.b64decode("".join(text[a + len(begin):b].split()), validate=True)
    except ValueError:
        raise ValueError("not a PEM public key") from None
    if not der.startswith(b"\x30") or len(der) < 4:
        raise ValueError("not a PEM public key")
    if len(der) != len(_SPKI_PREFIX) + 32 or not der.startswith(_SPKI_PREFIX):
        raise ValueError("not an Ed25519 key")
    return der[len(_SPKI_PREFIX):]


def load_public_key(path, backend=None):
    try:
        with open(path, "rb") as f:
            raw = parse_public_pem(f.read(65536))
    except OSError as exc:
        raise KeyError_("%s: cannot read (%s)" % (path, exc.strerror)) from None
    except ValueError as exc:
        raise KeyError_("%s: %s" % (path, exc)) from None
    return PublicKey(raw, backend)


def load_private_key(path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
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
        if k.verify(raw, data):
            return None, None
    return RejectCode.BAD_SIGNATURE, "bad signature"


def verify(command, public_keys):
    """None if a configured key signed the command, else the reason."""
    return check(command, public_keys)[1]


def generate(folder):
    """headend.key (private, mode 0600) and headend.pub in `folder`; returns the paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
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
