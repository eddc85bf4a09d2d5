#!/usr/bin/env python3
"""Mints a caller token (RS256 JWT) with the local stack's test issuer key.

    mint-token.py --org acme [--workspace ws-1] [--scope "read write admin"]
                  [--key tests/fixtures/jwt/platform-test-key.pem]
                  [--issuer https://platform.test/] [--audience plugin-delivery]
                  [--ttl 3600]

Prints the token. For the demo and operators' `cargo lambda invoke` runs
against the local stack only: the key is a test fixture, never a
deployment's. Uses `cryptography` (already in the stack's venv).
"""

import argparse
import base64
import json
import os
import sys
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_KEY = os.path.join(HERE, "..", "fixtures", "jwt", "platform-test-key.pem")


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--org", required=True)
    p.add_argument("--workspace")
    p.add_argument("--scope", default="read write admin")
    p.add_argument("--key", default=DEFAULT_KEY)
    p.add_argument("--kid", default="test-2026")
    p.add_argument("--issuer", default="https://platform.test/")
    p.add_argument("--audience", default="plugin-delivery")
    p.add_argument("--ttl", type=int, default=3600)
    a = p.parse_args()
    with open(a.key, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    now = int(time.time())
    claims = {"iss": a.issuer, "aud": a.audience, "sub": f"demo@{a.org}",
              "org_id": a.org, "scope": a.scope, "iat": now, "exp": now + a.ttl}
    if a.workspace:
        claims["workspace_id"] = a.workspace
    header = {"alg": "RS256", "typ": "JWT", "kid": a.kid}
    signing_input = (b64(json.dumps(header, separators=(",", ":")).encode()) + "." +
                     b64(json.dumps(claims, separators=(",", ":")).encode()))
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    sys.stdout.write(signing_input + "." + b64(sig) + "\n")


if __name__ == "__main__":
    main()
