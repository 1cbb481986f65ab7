#!/usr/bin/env python3
"""Calls a URL with the official x402 Python client (PyPI `x402`, pinned in
scripts/x402-client-requirements.txt; install with scripts/x402-client-setup.sh), paying a
402 automatically with the local private key in X402_PRIVATE_KEY.

Usage:
    X402_PRIVATE_KEY=0x... x402-client.py URL [--method POST] [--json BODY] [-H 'Name: value']...
    X402_PRIVATE_KEY=0x... x402-client.py --payload-for PAYMENT_REQUIRED_JSON

Prints JSON lines on stdout, in this order:
    {"payment_signature": <the decoded PAYMENT-SIGNATURE (v2) or X-PAYMENT (v1) the client
                           sent on its paid retry, or null when it did not pay>}
    {"status": <the final HTTP status>}
    {"body": <the final body: JSON when it parses, else the text>}
    {"payment_response": <the decoded PAYMENT-RESPONSE (or v1 X-PAYMENT-RESPONSE), or null>}
Exit status: 0 on a final 2xx, 1 on any other final status, 2 when the client failed
(bad arguments, no key, the payment could not be made).

--payload-for sends nothing: it prints the one line
    {"payment_payload": <the PaymentPayload the client would send for this PaymentRequired
                         (the 402's JSON, v2 or v1), decoded from the very header value>}
and exits 0, or 2 when the client cannot pay it.

Schemes: `exact` (v2 and v1) and `upto` (v2, Permit2: needs `extra.facilitatorAddress` in
the requirements), on every eip155 chain; with several requirements offered the client
takes the first it can pay.

Signing is local and offline: the `exact` and `upto` EVM schemes need only the EIP-712
signature (eth_account), no RPC. The client sends the header `PAYMENT-SIGNATURE` (base64 of the v2
PaymentPayload JSON) for a v2 402 (`PAYMENT-REQUIRED` header), or `X-PAYMENT` for a v1 402
(requirements in the JSON body), on one retry of the same request; that retry also carries
`Payment-Retry: 1` and `Access-Control-Expose-Headers: PAYMENT-RESPONSE,X-PAYMENT-RESPONSE`.
"""

import argparse
import base64
import json
import os
import sys


def decode(value):
    """The JSON in a base64 x402 header, or None."""
    if not value:
        return None
    try:
        return json.loads(base64.b64decode(value))
    except ValueError:
        return {"undecodable": value}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?")
    parser.add_argument(
        "--payload-for",
        metavar="PAYMENT_REQUIRED_JSON",
        help="print the payment payload for this 402 JSON instead of calling a URL",
    )
    parser.add_argument("--method", default="GET")
    parser.add_argument("--json", dest="json_body", help="a JSON request body")
    parser.add_argument(
        "-H", "--header", action="append", default=[], help="'Name: value', repeatable"
    )
    parser.add_argument("--timeout-s", type=float, default=30.0)
    args = parser.parse_args()
    if (args.url is None) == (args.payload_for is None):
        print("x402-client: give either a URL or --payload-for", file=sys.stderr)
        return 2

    key = os.environ.get("X402_PRIVATE_KEY")
    if not key:
        print("x402-client: set X402_PRIVATE_KEY (0x + 64 hex)", file=sys.stderr)
        return 2
    headers = {}
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep:
            print(f"x402-client: header {header!r} is not 'Name: value'", file=sys.stderr)
            return 2
        headers[name.strip()] = value.strip()
    body = None
    if args.json_body is not None:
        try:
            json.loads(args.json_body)
        except ValueError as e:
            print(f"x402-client: --json is not JSON: {e}", file=sys.stderr)
            return 2
        # Sent as given, byte for byte (both tries), not re-serialized.
        body = args.json_body.encode()
        if not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"

    # Imported here so that --help works without the client installed.
    import requests
    from eth_account import Account
    from x402 import x402ClientSync
    from x402.http.clients.requests import PaymentError, wrapRequestsWithPayment
    from x402.http.utils import encode_payment_signature_header
    from x402.mechanisms.evm.exact.register import register_exact_evm_client
    from x402.mechanisms.evm.upto import UptoEvmScheme
    from x402.schemas import PaymentRequired, PaymentRequiredV1

    account = Account.from_key(key)
    client = x402ClientSync()
    # v2 `exact` on every eip155 chain, and v1 `exact` on the v1 network names.
    register_exact_evm_client(client, account)
    # v2 `upto` on every eip155 chain (the package has no register helper for it).
    client.register("eip155:*", UptoEvmScheme(account))

    if args.payload_for is not None:
        try:
            required = json.loads(args.payload_for)
            model = PaymentRequiredV1 if required.get("x402Version") == 1 else PaymentRequired
            payload = client.create_payment_payload(model.model_validate(required))
        except Exception as e:  # the package raises many kinds; all mean "cannot pay"
            print(f"x402-client: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        header = encode_payment_signature_header(payload)
        print(json.dumps({"payment_payload": decode(header)}), flush=True)
        return 0
    session = wrapRequestsWithPayment(requests.Session(), client)
    try:
        resp = session.request(
            args.method, args.url, data=body, headers=headers, timeout=args.timeout_s
        )
    except (PaymentError, requests.RequestException) as e:
        print(f"x402-client: {type(e).__name__}: {e}", file=sys.stderr)
        return 2

    sent = resp.request.headers
    payment = sent.get("PAYMENT-SIGNATURE") or sent.get("X-PAYMENT")
    try:
        resp_body = resp.json()
    except ValueError:
        resp_body = resp.text
    settle = resp.headers.get("PAYMENT-RESPONSE") or resp.headers.get("X-PAYMENT-RESPONSE")
    for line in (
        {"payment_signature": decode(payment)},
        {"status": resp.status_code},
        {"body": resp_body},
        {"payment_response": decode(settle)},
    ):
        print(json.dumps(line), flush=True)
    return 0 if 200 <= resp.status_code < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
