"""The OpenAI SDK against vgate: directly (GKE, with the API key) or through Vertex AI.

    python examples/openai_client.py --base-url http://vgate.example/v1 --api-key KEY
    python examples/openai_client.py --vertex --project P --region us-central1 --endpoint ID

Through Vertex, the base URL is the endpoint's OpenAI-compatible route and the key
is a Google access token (`google.auth`); the endpoint must be dedicated.
"""

from __future__ import annotations

import argparse
import sys

import openai


def vertex_client(project: str, region: str, endpoint: str) -> openai.OpenAI:
    import google.auth
    import google.auth.transport.requests

    credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    credentials.refresh(google.auth.transport.requests.Request())
    base = (
        f"https://{region}-aiplatform.googleapis.com/v1beta1/"
        f"projects/{project}/locations/{region}/endpoints/{endpoint}"
    )
    return openai.OpenAI(base_url=base, api_key=credentials.token)


def chat(client: openai.OpenAI, prompt: str) -> str:
    """A chat answer, then the same question streamed token by token."""
    messages = [{"role": "user", "content": prompt}]
    answer = client.chat.completions.create(model="", messages=messages, max_tokens=32)
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="", messages=messages, max_tokens=32, stream=True
        )
        if chunk.choices
    )
    return f"{answer.choices[0].message.content}\n---\n{streamed}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", help="vgate's front door + /v1 (GKE, local)")
    parser.add_argument("--api-key", default="none", help="one of vgate's --api-key values")
    parser.add_argument("--vertex", action="store_true")
    parser.add_argument("--project")
    parser.add_argument("--region", default="us-central1")
    parser.add_argument("--endpoint")
    parser.add_argument("--prompt", default="Say hello.")
    args = parser.parse_args(argv)
    if args.vertex:
        client = vertex_client(args.project, args.region, args.endpoint)
    else:
        client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    print(chat(client, args.prompt))


if __name__ == "__main__":
    main(sys.argv[1:])
