"""Calling a vgate endpoint on Vertex AI with google-cloud-aiplatform.

    python examples/vertex_predict.py --project P --region us-central1 --endpoint ID

- `Endpoint.predict`: a text and a chat instance, as Google's notebooks send them;
  the text's prediction is "Prompt: ... Output: ...", the chat's a ChatCompletion.
- `Endpoint.raw_predict`: any body vgate's predict route takes, the answer as sent.
- `Endpoint.stream_raw_predict`: `"stream": true` instances, read as they arrive
  (server-sent events; needs a dedicated endpoint).
"""

from __future__ import annotations

import argparse
import json
import sys

from google.cloud import aiplatform


def predict(endpoint: aiplatform.Endpoint) -> list:
    text = {"prompt": "What is Vertex AI?", "max_tokens": 64, "temperature": 0}
    chat = {
        "@requestFormat": "chatCompletions",  # this instance is an OpenAI chat request
        "messages": [{"role": "user", "content": "And GKE?"}],
        "max_tokens": 64,
    }
    return list(endpoint.predict(instances=[text, chat]).predictions)


def raw_predict(endpoint: aiplatform.Endpoint) -> dict:
    body = {"instances": [{"prompt": "Hello", "max_tokens": 16}]}
    response = endpoint.raw_predict(
        body=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return response.json()


def stream(endpoint: aiplatform.Endpoint) -> None:
    body = {"instances": [{"prompt": "Count to five:", "max_tokens": 32, "stream": True}]}
    for line in endpoint.stream_raw_predict(
        body=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    ):  # one server-sent event line at a time, as bytes
        if line:
            print(line.decode(), flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--project", required=True)
    parser.add_argument("--region", default="us-central1")
    parser.add_argument("--endpoint", required=True, help="endpoint id or resource name")
    args = parser.parse_args(argv)
    aiplatform.init(project=args.project, location=args.region)
    endpoint = aiplatform.Endpoint(args.endpoint)
    for answer in predict(endpoint):
        print(answer)
    print(raw_predict(endpoint))
    stream(endpoint)


if __name__ == "__main__":
    main(sys.argv[1:])
