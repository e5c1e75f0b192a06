"""Signed store objects, for a bucket others can write (optional, off by default), the way Nix's binary caches
sign what they serve: a host that publishes holds a secret key (`CPT_STORE_SIGNING_KEY`), every host that reads
holds the public keys it trusts (`CPT_STORE_TRUSTED_KEYS`; a host's own key is trusted too). Then every object a
host trains on or decides by — an entry's manifest (which names its files' digests), the line and promotion
state, a release's manifest, a checkpoint's marker — is written sealed (signed) and read only if a trusted key
signed it for that very place in the root: an unsigned or badly signed manifest is a miss (logged with its key),
an unsigned state file is refused. A writer without a key cannot change a byte a host uses.

A sealed object is JSON: {"cpt-signed": 1, "key": NAME, "sig": BASE64, "payload": TEXT}, where the signature is
ed25519 over `cpt-store-v1 \\0 <place> \\0 <payload>` (the place: the object's name under the root, so a signed
line state of one line is not taken for another's, nor an entry's manifest for another key's).

Keys: `python -m tasks.core.signing generate NAME` prints a secret key line (`NAME:BASE64`, keep it on the
publishing hosts) and its public key line (give it to the readers). Either variable holds the key line(s) or
the path of a file holding them (one per line; several trusted keys may be separated by spaces or commas).

Not covered: a writer can put back an older object that was signed for the same place (a rollback of a state
file); signing says who wrote an object, not that it is the newest.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import sys
from pathlib import Path

from tasks.core.config.base import ConfigError

SIGNING_KEY = "CPT_STORE_SIGNING_KEY"
TRUSTED_KEYS = "CPT_STORE_TRUSTED_KEYS"
_MAGIC = b'{"cpt-signed"'
_DOMAIN = b"cpt-store-v1"


class KeySettingError(ConfigError):
    """A key setting that cannot be read (said at start, naming the variable)."""


class Unsigned(ValueError):
    """An object that is not signed by a trusted key for its place (unsigned, forged, or signed for another)."""


def _text(value: str, where: str) -> str:
    """The key line(s) a variable holds, or the file it names holds."""
    value = value.strip()
    if value and "\n" not in value and Path(value).expanduser().is_file():
        try:
            return Path(value).expanduser().read_text(encoding="utf-8")
        except OSError as e:
            raise KeySettingError(f"{where}: cannot read {value}: {e.strerror}") from None
    return value


def _decode(line: str, where: str, sizes: tuple[int, ...]) -> tuple[str, bytes]:
    name, sep, b64 = line.strip().partition(":")
    try:
        raw = base64.b64decode(b64, validate=True)
    except ValueError:
        raw = b""
    if not sep or not name or len(raw) not in sizes:
        raise KeySettingError(f"{where}: {line.strip()[:40]!r}… is not a key line NAME:BASE64 "
                        "(python -m tasks.core.signing generate NAME makes one)")
    return name, raw


@dataclasses.dataclass(frozen=True)
class Keys:
    """The signing key of this host (if it publishes) and the public keys it trusts (its own included)."""

    signer: tuple[str, object] | None = None  # (name, Ed25519PrivateKey)
    trusted: tuple[tuple[str, object], ...] = ()  # (name, Ed25519PublicKey)

    @property
    def verifying(self) -> bool:
        """Whether objects must be signed to be read (a key of either kind is set)."""
        return bool(self.trusted)

    def seal(self, place: str, payload: bytes) -> bytes:
        """`payload` as the object to store at `place`: sealed when this host signs, else as it is."""
        if self.signer is None:
            return payload
        name, key = self.signer
        text = payload.decode("utf-8")
        sig = key.sign(_message(place, text))
        return json.dumps({"cpt-signed": 1, "key": name, "sig": base64.b64encode(sig).decode(),
                           "payload": text}, ensure_ascii=False).encode()

    def open(self, place: str, data: bytes) -> bytes:
        """The payload of the object stored at `place`; Unsigned when this host verifies and no trusted key
        signed it for that place. With no key set, a sealed object is read as its payload, unchecked."""
        doc = None
        if data.lstrip().startswith(_MAGIC):
            try:
                doc = json.loads(data)
            except ValueError:
                doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("payload"), str):
            if self.verifying:
                raise Unsigned(f"{place} is not signed")
            return data
        if self.verifying:
            from cryptography.exceptions import InvalidSignature

            keys = [k for n, k in self.trusted if n == doc.get("key")]
            if not keys:
                raise Unsigned(f"{place} is signed by {str(doc.get('key'))[:40]!r}, which is not a trusted key")
            try:
                sig = base64.b64decode(str(doc.get("sig", "")), validate=True)
                keys[0].verify(sig, _message(place, doc["payload"]))
            except (InvalidSignature, ValueError):
                raise Unsigned(f"{place} does not carry a valid signature of {doc['key']!r} for its place") from None
        return doc["payload"].encode("utf-8")


def _message(place: str, text: str) -> bytes:
    return b"\0".join([_DOMAIN, place.encode("utf-8"), text.encode("utf-8")])


_CACHE: dict[tuple[str, str], Keys] = {}


def keys_from_env() -> Keys:
    """The keys $CPT_STORE_SIGNING_KEY and $CPT_STORE_TRUSTED_KEYS set (none: signing off); KeySettingError naming the
    variable when one cannot be read."""
    secret, trusted = os.environ.get(SIGNING_KEY, ""), os.environ.get(TRUSTED_KEYS, "")
    if (secret, trusted) in _CACHE:
        return _CACHE[(secret, trusted)]
    if not secret.strip() and not trusted.strip():
        keys = Keys()
    else:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

        signer, public = None, []
        if secret.strip():
            lines = [x for x in _text(secret, SIGNING_KEY).splitlines() if x.strip()]
            if len(lines) != 1:
                raise KeySettingError(f"{SIGNING_KEY}: one key line NAME:BASE64 expected, found {len(lines)}")
            name, raw = _decode(lines[0], SIGNING_KEY, (32, 64))  # a seed, or Nix's seed + public key
            key = Ed25519PrivateKey.from_private_bytes(raw[:32])
            signer = (name, key)
            public.append((name, key.public_key()))
        text = _text(trusted, TRUSTED_KEYS) if trusted.strip() else ""
        for line in text.replace(",", " ").split():
            name, raw = _decode(line, TRUSTED_KEYS, (32,))
            public.append((name, Ed25519PublicKey.from_public_bytes(raw)))
        keys = Keys(signer, tuple(public))
    _CACHE[(secret, trusted)] = keys
    return keys


def generate(name: str) -> tuple[str, str]:
    """A new key pair as (secret key line, public key line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not name or ":" in name or any(c.isspace() for c in name):
        raise ValueError(f"{name!r}: a key name has no ':' and no white space")
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"{name}:{base64.b64encode(seed).decode()}", f"{name}:{base64.b64encode(public).decode()}"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "generate":
        print("usage: python -m tasks.core.signing generate NAME", file=sys.stderr)
        return 2
    secret, public = generate(argv[1])
    print(f"# secret key (CPT_STORE_SIGNING_KEY on the hosts that publish; keep it secret):\n{secret}")
    print(f"# public key (CPT_STORE_TRUSTED_KEYS on the hosts that read):\n{public}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
