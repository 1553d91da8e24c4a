#!/usr/bin/env bash
# Smoke-test a built image without a container daemon (scripts/build-image.sh builds it):
#
# Usage: scripts/image-smoke.sh [TAG]     (default localhost/lmi-core:0.1.0-cpu)
#
# In a buildah container of the image it checks what a deployment relies on: the entrypoint is tini
# running lmi as a non-root user; the demo model builds inside; `lmi serve` answers /health and a
# generation; SIGTERM to tini lets a stream in flight finish (drain) and then every process of the
# container exits: no worker and no zombie is left. buildah's chroot isolation runs the container's
# processes on this host's network and process table, which is what lets the script reach and signal
# them. Exit 0 when all hold; each failure names its check.
set -euo pipefail
tag=${1:-localhost/lmi-core:0.1.0-cpu}
buildah=(buildah --storage-driver "${STORAGE_DRIVER:-vfs}")
port=${PORT:-18080}
work=$(mktemp -d)
container=$("${buildah[@]}" from -q "${tag}")
cleanup() {
    pkill -KILL -f "lmi serve --model-dir /models/demo" 2>/dev/null || true
    "${buildah[@]}" rm "${container}" >/dev/null 2>&1 || true
    rm -rf "${work}"
}
trap cleanup EXIT
fail() { echo "image-smoke: FAILED: $*" >&2; tail -20 "${work}/serve.log" >&2 || true; exit 1; }
run() { "${buildah[@]}" run --isolation chroot "$@"; }

# The image's own entrypoint and user, as a runtime starts them.
IFS='|' read -r entrypoint user < <("${buildah[@]}" inspect --type image "${tag}" | python3 -c '
import json, sys
config = json.load(sys.stdin)["OCIv1"]["config"]
print(" ".join(config["Entrypoint"]), config.get("User", ""), sep="|")')
[[ ${entrypoint} == "/usr/bin/tini -- lmi" ]] || fail "entrypoint is '${entrypoint}', not tini -- lmi"
[[ ${user} != "" && ${user} != 0 && ${user} != root ]] || fail "runs as '${user:-root}', not a non-root user"
read -ra argv <<<"${entrypoint}"
[[ $(run "${container}" -- id -u) != 0 ]] || fail "the container's user is root"

# Not PID 1 here (no process namespace): a subreaper, tini reaps the orphans it would reap as PID 1.
run --env TINI_SUBREAPER=1 "${container}" -- "${argv[@]}" demo-model /models/demo >/dev/null \
    || fail "lmi demo-model"
run --env "SERVING_INFERENCE_ADDRESS=http://127.0.0.1:${port}" --env TINI_SUBREAPER=1 "${container}" -- \
    "${argv[@]}" serve --model-dir /models/demo >"${work}/serve.log" 2>&1 &
runner=$!
for _ in $(seq 180); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' "localhost:${port}/health") == 200 ]] && break
    kill -0 "${runner}" 2>/dev/null || fail "lmi serve exited before it was ready"
    sleep 1
done
[[ $(curl -s -o /dev/null -w '%{http_code}' "localhost:${port}/health") == 200 ]] || fail "/health is not 200"
body='{"inputs": "Hello", "parameters": {"max_new_tokens": 8}}'
curl -sf "localhost:${port}/invocations" -H 'content-type: application/json' -d "${body}" \
    | grep -q generated_text || fail "no generated_text from /invocations"
echo "image-smoke: serving: /health 200, /invocations answered"

tini=$(pgrep -f "^/usr/bin/tini -- lmi serve --model-dir /models/demo") || fail "tini is not running lmi"
stream='{"inputs": "Hello", "stream": true, "parameters": {"max_new_tokens": 200, "ignore_eos_token": true}}'
curl -sN "localhost:${port}/invocations" -H 'content-type: application/json' -d "${stream}" \
    >"${work}/stream.out" &
client=$!
sleep 1
kill -TERM "${tini}"
wait "${client}" || fail "the stream in flight broke at SIGTERM"
tail -n 1 "${work}/stream.out" | grep -q generated_text || fail "the stream in flight did not finish"
echo "image-smoke: SIGTERM: the stream in flight finished ($(wc -l <"${work}/stream.out") lines)"
for _ in $(seq 60); do kill -0 "${runner}" 2>/dev/null || break; sleep 1; done
kill -0 "${runner}" 2>/dev/null && fail "the container did not exit within 60 s of SIGTERM"
left=$(pgrep -fa "^/opt/lmi/bin/python3" || true)
[[ -z ${left} ]] || fail "processes left after exit: ${left}"
grep -q "Application shutdown complete" "${work}/serve.log" || fail "no clean shutdown in the log"
echo "image-smoke: passed (${tag})"
