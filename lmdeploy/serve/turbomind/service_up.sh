#!/bin/bash
# Serve this workspace with Triton Inference Server, without docker (deploy copies this script
# into the workspace and sets TP below). Flags go to the launcher, e.g.
#   bash service_up.sh --grpc_port 33337 [--http_port 33338] [--host 0.0.0.0]
# Ctrl-C or SIGTERM stops the server. PYTHON selects the interpreter (default: python3).

TP=1

if [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    cat <<USAGE
Usage: bash $0 [--grpc_port 33337] [--http_port PORT] [--metrics_port PORT] [--host 0.0.0.0]
               [--max_batch_size N] [--verbose]

Starts Triton Inference Server (from nvidia-pytriton) with the TurboMind engine on this
workspace (TP=${TP}); clients: python -m lmdeploy.serve.client <host>:33337
USAGE
    exit 0
fi

WORKSPACE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" -m lmdeploy.serve.turbomind.triton_server "${WORKSPACE_DIR}" --tp "${TP}" "$@"
