#!/bin/bash
# Start Triton Inference Server with the TurboMind backend on the workspace this script lives
# in (deploy copies it to <workspace>/ and sets the tensor-parallel degree below).

show_help() {
    cat <<EOF
Usage: bash $0 [--lib-dir DIR] | -h | --help

Starts tritonserver in the openmmlab/lmdeploy:latest docker image, serving this workspace's
model_repository on GPUs 0..TP-1 (TP=${TP} for this workspace).

  --lib-dir DIR  mount DIR (a custom build of the TurboMind backend, i.e. the folder holding
                 libtriton_turbomind.so) at /opt/tritonserver/backends/turbomind
  -h, --help     show this help and exit

Ports: gRPC on 33337 (clients: python -m lmdeploy.serve.client <host>:33337), ssh (container
port 22) on 33336, and the range 33337-33400 is published. HTTP is off.
EOF
}

TP=1

LIB_DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help)
            show_help
            exit 0
            ;;
        --lib-dir)
            if [ $# -lt 2 ] || [ -z "$2" ]; then
                echo "error: --lib-dir needs a directory" >&2
                show_help >&2
                exit 2
            fi
            LIB_DIR="$2"
            shift 2
            ;;
        --lib-dir=*)
            LIB_DIR="${1#--lib-dir=}"
            shift
            ;;
        *)
            echo "error: unknown argument: $1" >&2
            show_help >&2
            exit 2
            ;;
    esac
done

WORKSPACE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

DEVICES="0"
for ((i = 1; i < TP; i++)); do
    DEVICES="${DEVICES},${i}"
done

LIB_MOUNT=()
if [ -n "${LIB_DIR}" ]; then
    if [ ! -d "${LIB_DIR}" ]; then
        echo "error: --lib-dir ${LIB_DIR} is not a directory" >&2
        exit 2
    fi
    LIB_DIR="$(cd "${LIB_DIR}" && pwd)"
    LIB_MOUNT=(-v "${LIB_DIR}:/opt/tritonserver/backends/turbomind")
fi

exec docker run \
    --gpus "device=${DEVICES}" \
    --rm \
    -v "${WORKSPACE_DIR}:/workspace/models" \
    "${LIB_MOUNT[@]}" \
    --shm-size 16g \
    -p 33336:22 \
    -p 33337-33400:33337-33400 \
    --cap-add=SYS_PTRACE \
    --cap-add=SYS_ADMIN \
    --security-opt seccomp=unconfined \
    --name lmdeploy \
    -it --env NCCL_LAUNCH_MODE=GROUP openmmlab/lmdeploy:latest \
    tritonserver \
    --model-repository=/workspace/models/model_repository \
    --allow-http=0 \
    --allow-grpc=1 \
    --grpc-port=33337 \
    --log-verbose=0 \
    --allow-metrics=1
