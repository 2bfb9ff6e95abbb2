"""The official Mistral Python SDK (mistralai v3), pointed at Envoy with a shield token.

Only the base URL and the key differ from talking to api.mistral.ai directly.
Usage: python sdk_client.py <server_url> <token>  -> prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import sys

from mistralai.client import Mistral
from mistralai.client.errors import SDKError


def main(server_url: str, token: str) -> dict:
    client = Mistral(api_key=token, server_url=server_url, timeout_ms=30_000)
    out: dict = {}
    try:
        res = client.chat.complete(model="mistral-small-latest",
                                   messages=[{"role": "user", "content": "Hello from Python"}])
        out["chat"] = {"content": res.choices[0].message.content, "usage": res.usage.model_dump()}

        text, usage = "", None
        for event in client.chat.stream(model="mistral-small-latest",
                                        messages=[{"role": "user", "content": "Count"}]):
            if event.data.choices:
                text += event.data.choices[0].delta.content or ""
            if event.data.usage:
                usage = event.data.usage.model_dump()
        out["stream"] = {"text": text, "usage": usage}

        emb = client.embeddings.create(model="mistral-embed", inputs=["a", "b"])
        out["embeddings"] = {"count": len(emb.data), "usage": emb.usage.model_dump()}
    except SDKError as err:
        # A ShieldKey denial arrives as Mistral's own error shape: a normal SDK error.
        out["error"] = {"status": err.status_code, "body": err.body}
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
