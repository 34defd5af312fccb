#!/usr/bin/env bash
# `make container-test`: build the serving image, run it, wait for /health/ready, grade a real fundus photo
# through it, check the answer, stop it. The last line printed is the verdict, the image size and the result.
#
# Environment (all optional):
#   CONTAINER_ENGINE  podman (default; Debian: apt-get install podman runc) or docker
#   BASE_IMAGE        base for both stages (default docker.io/library/python:3.11-slim-bookworm); when it is
#                     absent and cannot be pulled, a base is built from Debian packages (build-base.sh)
#   LOCAL_BASE=1      skip the pull attempt and use the Debian-built base straight away
#   IMAGE             tag to build (default localhost/retinagrade:test)
#   MODEL_DIR         folder with retinagrade-dr.onnx/.json + gate.json when models/ is still empty
#                     (default cache/dev-model, the development model)
#   SAMPLE_IMAGE      photo to grade (default ../shared/data/raw-fundus-samples/images/16_right.jpeg, else
#                     tests/fixtures/retina_right.jpg in a clone without ../shared)
#   IMAGE_BUDGET_MB   largest acceptable image (default 500): a bigger image FAILs the test
#   CA_BUNDLE         CA bundle pip must trust during the build (default /etc/ssl/certs/ca-certificates.crt)
#   KEEP_IMAGE=1      leave the image in local storage (default: kept; set KEEP_IMAGE=0 to remove it)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
engine="${CONTAINER_ENGINE:-podman}"
image="${IMAGE:-localhost/retinagrade:test}"
base="${BASE_IMAGE:-docker.io/library/python:3.11-slim-bookworm}"
local_base="localhost/retinagrade-base:bookworm-py311"
ca_bundle="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
sample="${SAMPLE_IMAGE:-$repo/../shared/data/raw-fundus-samples/images/16_right.jpeg}"
[[ -n "${SAMPLE_IMAGE:-}" || -f "$sample" ]] || sample="$repo/tests/fixtures/retina_right.jpg"
budget_mb="${IMAGE_BUDGET_MB:-500}"
labels="$(dirname "$(dirname "$sample")")/labels.csv"
say() { echo "container-test: $*"; }

command -v "$engine" >/dev/null || { say "FAIL: $engine not found (apt-get install podman runc)"; exit 1; }

# 1. Base image: the named one if present or pullable, else one built here from Debian packages.
if ! "$engine" image exists "$base" 2>/dev/null; then
    if [[ "${LOCAL_BASE:-0}" != 1 ]] && timeout 60 "$engine" pull -q "$base" >/dev/null 2>&1; then
        say "pulled $base"
    else
        say "$base absent and not pullable: using a base built from Debian packages ($local_base)"
        "$repo/deploy/container/build-base.sh" "$local_base"
        base="$local_base"
    fi
fi

# 2. Build context: the repository, or a scratch copy with the development model when models/ is empty.
context="$repo"
scratch=""
cleanup() {
    [[ -n "${container:-}" ]] && "$engine" rm -f "$container" >/dev/null 2>&1 || true
    [[ -n "$scratch" ]] && rm -rf "$scratch"
    [[ "${KEEP_IMAGE:-1}" == 0 ]] && "$engine" rmi -f "$image" >/dev/null 2>&1 || true
}
trap cleanup EXIT
if [[ ! -f models/retinagrade-dr.onnx || ! -f models/retinagrade-dr.json || ! -f models/gate.json ]]; then
    dev="${MODEL_DIR:-$repo/cache/dev-model}"
    [[ -f "$dev/retinagrade-dr.onnx" ]] || { say "FAIL: models/ lacks the model and there is none in $dev"; exit 1; }
    scratch="$(mktemp -d /var/tmp/retinagrade-context.XXXXXX)"
    say "models/ lacks the ONNX model, its spec or gate.json: building from a scratch context with the model in $dev"
    cp -r Dockerfile .dockerignore pyproject.toml README.md LICENSE constraints.txt src "$scratch/"
    mkdir -p "$scratch/deploy/container" "$scratch/models"
    cp deploy/container/healthcheck.py "$scratch/deploy/container/"
    cp "$dev"/retinagrade-dr.onnx "$dev"/retinagrade-dr.json "$dev"/gate.json "$scratch/models/"
    context="$scratch"
fi
model_version="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' \
    "$context/models/retinagrade-dr.json")"

secret=()
[[ -s "$ca_bundle" ]] && secret=(--secret "id=ca_bundle,src=$ca_bundle")
format=()
[[ "$engine" == podman ]] && format=(--format docker)   # keep HEALTHCHECK (OCI format has none)
say "building $image on $base (model $model_version)"
start=$(date +%s)
"$engine" build "${format[@]}" "${secret[@]}" --build-arg "BASE_IMAGE=$base" \
    --build-arg "MODEL_VERSION=$model_version" --build-arg "VCS_REF=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    -t "$image" -f "$context/Dockerfile" "$context" >"${BUILD_LOG:-/tmp/retinagrade-container-build.log}" 2>&1 \
    || { tail -40 "${BUILD_LOG:-/tmp/retinagrade-container-build.log}"; say "FAIL: build"; exit 1; }
build_s=$(( $(date +%s) - start ))
size_bytes="$("$engine" image inspect --format '{{.Size}}' "$image")"
size_mb=$(( size_bytes / 1000000 ))
say "built in ${build_s}s, ${size_mb} MB (budget ${budget_mb} MB)"
if (( size_bytes > budget_mb * 1000000 )); then
    say "FAIL image=$image size=${size_mb}MB is over the ${budget_mb} MB budget; build=${build_s}s"
    exit 1
fi

if [[ ! -f "$sample" ]]; then
    say "SKIP run: no sample photo at $sample; image=$image size=${size_mb}MB build=${build_s}s"
    exit 0
fi

# 3. Run it on the host network, bound to loopback only, on a free port.
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
container="retinagrade-test-$$"
# Read-only root file system, as in production; the audit store goes to the tmpfs podman mounts on /tmp.
# Limits below the host's hard limits: podman's defaults exceed what an unprivileged sandbox (no
# CAP_SYS_RESOURCE) may set, and runc then refuses to start the container.
nofile=$(( $(ulimit -Hn) < 65536 ? $(ulimit -Hn) : 65536 ))
"$engine" run -d --rm --name "$container" --network host --read-only \
    --ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096 --cpus 2 --memory 2g \
    -e RETINAGRADE_HOST=127.0.0.1 -e RETINAGRADE_PORT="$port" \
    -e RETINAGRADE_AUDIT_PATH=/tmp/retinagrade-audit.sqlite3 "$image" \
    > /dev/null 2> >(grep -v 'systemd connection' >&2)   # podman without systemd: no health-check timers
url="http://127.0.0.1:$port"
ready=0
for _ in $(seq 1 120); do
    if curl -fsS -o /dev/null "$url/health/ready" 2>/dev/null; then ready=1; break; fi
    if ! "$engine" container exists "$container"; then break; fi
    sleep 1
done
if [[ "$ready" != 1 ]]; then
    "$engine" logs --tail 40 "$container" 2>&1 || true
    say "FAIL: /health/ready never answered; image=$image size=${size_mb}MB"
    exit 1
fi

# 4. Grade the photo and check the answer.
answer="$(curl -sS -w '\n%{http_code}' -F "file=@$sample;type=image/jpeg" "$url/v1/grade")"
code="${answer##*$'\n'}"
body="${answer%$'\n'*}"
reference="$(awk -F, -v name="images/$(basename "$sample")" '$1==name {print $2}' "$labels" 2>/dev/null || true)"
# Run the image's own HEALTHCHECK once: without systemd, podman's health-check timers never fire.
if "$engine" healthcheck run "$container" >/dev/null 2>&1; then health=healthy; else health=unhealthy; fi
result="$(python3 - "$code" "$body" "$model_version" "${reference:-}" <<'PY'
import json, sys
code, body, version, reference = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
if code != "200":
    print(f"FAIL http={code} body={body[:300]}"); sys.exit(0)
doc = json.loads(body)
result = doc.get("result", doc) if isinstance(doc, dict) else doc
status = result.get("status")
problems = []
if status not in ("graded", "ungradable", "not_fundus"):
    problems.append(f"status={status!r}")
grade = result.get("grade")
if status == "graded" and not (isinstance(grade, int) and 0 <= grade <= 4):
    problems.append(f"grade={grade!r}")
if version not in json.dumps(doc):
    problems.append(f"model version {version} not in the answer")
ref = f" reference={reference}" if reference else ""
verdict = "PASS" if not problems else "FAIL " + ",".join(problems)
print(f"{verdict} status={status} grade={grade} referable={result.get('referable')}{ref}")
PY
)"
"$engine" stop -t 10 "$container" >/dev/null 2>&1 || true
echo "$body" > "${ANSWER_FILE:-/tmp/retinagrade-container-answer.json}"
line="image=$image size=${size_mb}MB build=${build_s}s health=$health result: $result"
if [[ "$result" == PASS* ]]; then
    say "PASS $line"
else
    say "FAIL $line"
    exit 1
fi
