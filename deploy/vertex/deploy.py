"""Uploads vgate as a Vertex AI Model and deploys it to an endpoint, as Google's
Model Garden notebooks do with their vLLM container (same routes, ports, shared
memory and 2 h deployment timeout), with vgate's image and arguments.

    python deploy/vertex/deploy.py --project P --region us-central1 \\
        --image us-docker.pkg.dev/P/vgate/vgate:0.1.0 \\
        --model gs://BUCKET/models/llama-3.1-8b-instruct \\
        --machine-type g2-standard-24 --accelerator-type NVIDIA_L4 --accelerator-count 2

`--dry-run` prints what it would send and sends nothing. Arguments after `--` go
to `vgate serve` as they are (vLLM's engine flags included).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

SHARED_MEMORY_MB = 16 * 1024  # the notebooks' value: NCCL and vLLM's workers use /dev/shm
DEPLOYMENT_TIMEOUT_S = 7200  # the longest Vertex allows: a large model downloads first


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="deploy.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--project", required=True, help="Google Cloud project id")
    parser.add_argument("--region", default="us-central1", help="Vertex AI region")
    parser.add_argument("--image", required=True, help="vgate's image in Artifact Registry")
    parser.add_argument("--model", required=True, help="gs:// prefix or Hugging Face id")
    parser.add_argument("--display-name", default="vgate", help="model and endpoint name")
    parser.add_argument("--machine-type", default="g2-standard-24")
    parser.add_argument("--accelerator-type", default="NVIDIA_L4")
    parser.add_argument("--accelerator-count", type=int, default=2)
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=1)
    parser.add_argument(
        "--scale-on-waiting",
        type=int,
        metavar="N",
        help="autoscale on vLLM's waiting requests per replica (Vertex reads the engines' "
        "vllm:num_requests_waiting)",
    )
    parser.add_argument("--hf-token", help="for gated Hugging Face models (HF_TOKEN)")
    parser.add_argument("--service-account", help="the serving container's identity")
    parser.add_argument(
        "--dedicated-endpoint",
        action="store_true",
        help="a dedicated endpoint (its own DNS name; needed for streaming and the OpenAI "
        "routes through Vertex)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the requests, send none")
    parser.add_argument("serve_args", nargs="*", help="after --: more `vgate serve` arguments")
    return parser.parse_args(argv)


def upload_request(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of aiplatform.Model.upload."""
    env = {"MODEL_ID": args.model, "DEPLOY_SOURCE": "vgate"}
    if args.hf_token:
        env["HF_TOKEN"] = args.hf_token
    return {
        "display_name": args.display_name,
        "serving_container_image_uri": args.image,
        # The image's entrypoint is `vgate serve`; Google's own argument lists work too.
        "serving_container_args": [f"--model={args.model}", *args.serve_args],
        "serving_container_ports": [8080],
        "serving_container_predict_route": "/generate",
        "serving_container_health_route": "/ping",
        "serving_container_environment_variables": env,
        "serving_container_shared_memory_size_mb": SHARED_MEMORY_MB,
        "serving_container_deployment_timeout": DEPLOYMENT_TIMEOUT_S,
    }


def deploy_request(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of Model.deploy (the endpoint aside)."""
    request: dict[str, Any] = {
        "deployed_model_display_name": args.display_name,
        "machine_type": args.machine_type,
        "accelerator_type": args.accelerator_type,
        "accelerator_count": args.accelerator_count,
        "min_replica_count": args.min_replicas,
        "max_replica_count": args.max_replicas,
        "deploy_request_timeout": 1800,
    }
    if args.scale_on_waiting is not None:
        request["autoscaling_target_vllm_num_requests_waiting"] = args.scale_on_waiting
    if args.service_account:
        request["service_account"] = args.service_account
    return request


def main(argv: list[str]) -> int:
    args = parse(argv)
    upload, deploy = upload_request(args), deploy_request(args)
    if args.dry_run:
        shown = json.loads(json.dumps({"upload": upload, "deploy": deploy}))
        if args.hf_token:
            shown["upload"]["serving_container_environment_variables"]["HF_TOKEN"] = "<set>"
        print(json.dumps(shown, indent=2))
        return 0
    from google.cloud import aiplatform

    aiplatform.init(project=args.project, location=args.region)
    endpoint = aiplatform.Endpoint.create(
        display_name=args.display_name, dedicated_endpoint_enabled=args.dedicated_endpoint
    )
    model = aiplatform.Model.upload(**upload)
    model.deploy(endpoint=endpoint, **deploy)
    print(endpoint.resource_name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
