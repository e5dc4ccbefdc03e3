#!/bin/sh
# One node of a multi-node glm-serve group on vLLM's Ray executor (TP inside a node, PP across nodes).
#
#   glm-ray-node leader NODES [glm-serve serve flags...]
#       starts the Ray head, waits until NODES nodes have joined, then becomes `glm-serve serve`
#       (exec: it receives SIGTERM and drains like a single-node server)
#   glm-ray-node worker LEADER_ADDRESS
#       joins the head at LEADER_ADDRESS and blocks; vLLM places its workers here through Ray
#
# GLM_RAY_PORT (6379) is the head's port, GLM_RAY_WAIT_S (1200) how long the leader waits for workers.
set -eu

ray_port="${GLM_RAY_PORT:-6379}"
role="${1:-}"
[ $# -gt 0 ] && shift

alive_nodes() {
    python3 -c 'import ray; ray.init(address="auto", logging_level="ERROR"); print(sum(1 for n in ray.nodes() if n["Alive"]))'
}

case "$role" in
leader)
    nodes="${1:?leader: give the number of nodes in the group}"
    shift
    ray start --head --port="$ray_port"
    deadline=$(($(date +%s) + ${GLM_RAY_WAIT_S:-1200}))
    until [ "$(alive_nodes 2>/dev/null || echo 0)" -ge "$nodes" ]; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "glm-ray-node: fewer than $nodes Ray nodes after ${GLM_RAY_WAIT_S:-1200} s" >&2
            exit 1
        fi
        sleep 5
    done
    exec glm-serve serve "$@"
    ;;
worker)
    leader="${1:?worker: give the leader address}"
    exec ray start --address="$leader:$ray_port" --block
    ;;
*)
    echo "usage: glm-ray-node leader NODES [serve flags...] | glm-ray-node worker LEADER_ADDRESS" >&2
    exit 2
    ;;
esac
