#!/usr/bin/env bash
# Docker smoke test, offline: build the image, bring the compose stack up (CPU override), send a CIFAR-10
# image through the container, see Prometheus (in its container) scrape the service, scale out to two
# replicas behind nginx (each with two HTTP worker processes, SIAM_WORKERS=2), and take the stack down. It runs the commands docker/README.md gives.
#
#   docker/smoke-test.sh            exit 0: passed (or "SKIPPED: no docker engine"), non-zero: failed
#
# The image is built by `docker-compose build`, the way `up --build` builds it. SIAM_SMOKE_PIP picks where
# its Python packages come from: "wheels" (default), offline from docker/wheels/; or "index", from a
# package index, here a PEP 503 index that this script serves from the same wheels kept outside the
# build context ($SIAM_WHEELS_DIR, default ~/.cache/siam/wheels), as a mirror would.
#
# Settings (environment): SIAM_SMOKE_CHECKPOINT (default checkpoints/resnet20-trades30), SIAM_SMOKE_DATA
# (the CIFAR-10 JPEG archive), SIAM_SMOKE_SCALE=0 (skip the two-replica check), SIAM_SMOKE_TIMEOUT
# (seconds to wait for readiness, default 300), and the images: SIAM_BASE_IMAGE, SIAM_IMAGE,
# PROMETHEUS_IMAGE, NGINX_IMAGE, GRAFANA_IMAGE. Where no registry is reachable, Prometheus and nginx run
# from siam-tools:local, a Debian image that docker/build-base.sh makes with Debian's packages.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export SIAM_BASE_IMAGE="${SIAM_BASE_IMAGE:-siam-base:local}"
export SIAM_IMAGE="${SIAM_IMAGE:-siam-serve:local}"
export PROMETHEUS_IMAGE="${PROMETHEUS_IMAGE:-siam-tools:local}"
export NGINX_IMAGE="${NGINX_IMAGE:-siam-tools:local}"
export GRAFANA_IMAGE="${GRAFANA_IMAGE:-grafana/grafana:11.1.0}"
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-siam-smoke}"  # never touches a stack of yours
# Free host ports, so that a stack or a service already on 8000/9090/8080 does not get in the way.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export SIAM_PUBLISH="${SIAM_PUBLISH:-$(free_port):8000}"
export PROMETHEUS_PORT="${PROMETHEUS_PORT:-$(free_port)}"
export LB_PORT="${LB_PORT:-$(free_port)}"
export GRAFANA_PORT="${GRAFANA_PORT:-$(free_port)}"
checkpoint="${SIAM_SMOKE_CHECKPOINT:-checkpoints/resnet20-trades30}"
data="${SIAM_SMOKE_DATA:-$root/../shared/data/cifar10-jpeg.tar.gz}"
timeout="${SIAM_SMOKE_TIMEOUT:-300}"
work="$(mktemp -d)"
started=$SECONDS
dockerd_pid=""
index_pid=""
tools_pid=""  # the background build of siam-tools:local
stack_up=0

say() { printf '[smoke %4ds] %s\n' "$((SECONDS - started))" "$*"; }
fail() { say "FAIL: $*"; exit 1; }

# --- a Docker engine: the running one, or one we start (and stop) ourselves -------------------------
if ! command -v docker >/dev/null; then
  echo "SKIPPED: no docker engine (no docker command)"; exit 0
fi
if ! docker info >/dev/null 2>&1; then
  if [[ $EUID -eq 0 ]] && command -v dockerd >/dev/null; then
    say "starting dockerd"
    nice -n 10 dockerd >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do
      docker info >/dev/null 2>&1 || ! kill -0 "$dockerd_pid" 2>/dev/null && break
      sleep 1
    done
  fi
  if ! docker info >/dev/null 2>&1; then
    echo "SKIPPED: no docker engine (none running, and dockerd could not be started here)"
    tail -5 "$work/dockerd.log" 2>/dev/null || true
    [[ -z "$dockerd_pid" ]] || kill "$dockerd_pid" 2>/dev/null || true
    exit 0
  fi
fi
if command -v docker-compose >/dev/null; then
  compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  fail "neither docker-compose nor the docker compose plugin is installed"
fi
compose+=(-f docker-compose.yml -f docker-compose.cpu.yml)

cleanup() {
  local status=$?
  if [[ $stack_up == 1 ]]; then
    [[ $status != 0 ]] && "${compose[@]}" --profile scale logs --tail=60 2>&1 | tail -150
    say "taking the stack down"
    "${compose[@]}" --profile scale down --volumes --remove-orphans >"$work/down.log" 2>&1 || cat "$work/down.log"
  fi
  [[ -z "$index_pid" ]] || kill "$index_pid" 2>/dev/null || true
  [[ -z "$tools_pid" ]] || wait "$tools_pid" 2>/dev/null || true  # (a failure before it was waited for)
  if [[ -n "$dockerd_pid" ]]; then
    kill "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
  if [[ $status == 0 ]]; then say "SMOKE TEST PASSED"; else say "SMOKE TEST FAILED"; fi
}
trap cleanup EXIT

# --- images, built offline --------------------------------------------------------------------------
[[ -f "$checkpoint/manifest.json" ]] || fail "no checkpoint at $checkpoint (train one, or set SIAM_SMOKE_CHECKPOINT)"
[[ -f "$data" ]] || fail "no CIFAR-10 archive at $data (set SIAM_SMOKE_DATA)"
ensure_debian_image() {  # TAG [EXTRA_PACKAGES...]: made with debootstrap when it is missing
  docker image inspect "$1" >/dev/null 2>&1 || docker/build-base.sh "$@"
}
[[ "$SIAM_BASE_IMAGE" == siam-base:local ]] && ensure_debian_image siam-base:local
# The Prometheus and nginx image is needed only once the stack comes up: it is made in the background,
# beside the service image's build (on 2 cores the smoke test took 382 s instead of 482 s).
if [[ "$PROMETHEUS_IMAGE" == siam-tools:local || "$NGINX_IMAGE" == siam-tools:local ]]; then
  ensure_debian_image siam-tools:local prometheus nginx-light >"$work/tools.log" 2>&1 &
  tools_pid=$!
fi
export SIAM_BUILD_CHECKPOINT="$checkpoint"
# The wheels in DIR were downloaded for the requirement list pyproject.toml gives now. (Compared by content,
# not by date: a fresh clone's pyproject.toml is always newer than the wheels kept from an earlier run.)
wheels_current() {
  [[ -f "$1/requirements.txt" ]] && cmp -s "$1/requirements.txt" <(python3 docker/requirements.py pyproject.toml)
}
case "${SIAM_SMOKE_PIP:-wheels}" in
  wheels)
    if ! wheels_current docker/wheels; then
      say "downloading wheels"
      docker/download-wheels.sh
    fi ;;
  index)
    [[ -z "$(find docker/wheels -name '*.whl' 2>/dev/null | head -1)" ]] ||
      fail "SIAM_SMOKE_PIP=index needs a docker/wheels/ without wheels (they would be installed instead)"
    wheels="${SIAM_WHEELS_DIR:-$HOME/.cache/siam/wheels}"
    wheels_current "$wheels" || SIAM_WHEELS_DIR="$wheels" docker/download-wheels.sh
    # A "simple" index: a folder per normalized project name, holding links to its wheels.
    for whl in "$wheels"/*.whl; do
      project="$(basename "$whl" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')"
      mkdir -p "$work/index/simple/$project"
      ln -sf "$whl" "$work/index/simple/$project/"
    done
    # The host's address on the default bridge, which containers reach. A freshly initialised engine
    # (new data root) records only the subnet, no gateway: then read the bridge interface's address.
    gateway="$(docker network inspect bridge --format '{{range .IPAM.Config}}{{.Gateway}}{{end}}')"
    if [[ -z "$gateway" ]]; then
      bridge="$(docker network inspect bridge --format '{{index .Options "com.docker.network.bridge.name"}}')"
      gateway="$(ip -4 -o addr show "${bridge:-docker0}" 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -1)"
    fi
    [[ -n "$gateway" ]] || fail "no IPv4 address for the default docker bridge: the containers could not reach the index"
    # The same port from run to run where it is free: the index's address is a build argument, part of the
    # build cache's key, so a new one each run would reinstall the dependencies (6 GB) every time.
    port="${SIAM_SMOKE_INDEX_PORT:-43141}"
    python3 -c 'import socket, sys; socket.socket().bind((sys.argv[1], int(sys.argv[2])))' "$gateway" "$port" \
      2>/dev/null || port="$(free_port)"
    python3 -m http.server --bind "$gateway" --directory "$work/index" "$port" >"$work/index.log" 2>&1 &
    index_pid=$!
    export PIP_INDEX_URL="http://$gateway:$port/simple/" PIP_TRUSTED_HOST="$gateway"
    deadline=$((SECONDS + 30))
    until curl -sf "$PIP_INDEX_URL" >/dev/null; do
      ((SECONDS < deadline)) || fail "the package index at $PIP_INDEX_URL did not start"
      sleep 1
    done
    say "package index at $PIP_INDEX_URL ($(find "$work/index/simple" -mindepth 1 -maxdepth 1 | wc -l) projects)" ;;
  *) fail "SIAM_SMOKE_PIP must be wheels or index, not ${SIAM_SMOKE_PIP}" ;;
esac
say "building $SIAM_IMAGE with $checkpoint: ${compose[*]} build siam-cpu"
previous="$(docker image inspect --format '{{.Id}}' "$SIAM_IMAGE" 2>/dev/null || true)"
"${compose[@]}" build siam-cpu >"$work/build.log" 2>&1 || { tail -40 "$work/build.log"; fail "docker-compose build"; }
grep -m1 "install-deps:" "$work/build.log" | sed 's/^/[smoke] /' || true
say "built $SIAM_IMAGE ($(docker image inspect --format '{{.Size}}' "$SIAM_IMAGE" | numfmt --to=iec))"
# The tag moved to the new image: the one it named before (several GB) would stay behind untagged.
if [[ -n "$previous" && "$previous" != "$(docker image inspect --format '{{.Id}}' "$SIAM_IMAGE")" ]]; then
  if docker image rm "$previous" >/dev/null 2>&1; then say "removed the previous $SIAM_IMAGE (${previous:7:12})"; fi
fi
# So would the build stages of earlier builds (docker/Dockerfile labels them): the untagged ones that
# nothing is built on. The newest of each stage is this build's (made now, or taken from the cache) and the
# next build's cache: it stays.
stale=()
for stage in requirements deps app; do
  mapfile -t -O "${#stale[@]}" stale < <(docker images --quiet --filter dangling=true \
    --filter "label=siam-serve.build-stage=$stage" | tail -n +2)
done
if ((${#stale[@]})) && docker image rm "${stale[@]}" >/dev/null 2>&1; then
  say "removed ${#stale[@]} untagged build stages of earlier builds"
fi

if [[ -n "$tools_pid" ]]; then
  wait "$tools_pid" || { cat "$work/tools.log"; fail "docker/build-base.sh siam-tools:local"; }
  sed 's/^/[smoke] /' "$work/tools.log"
fi

# Grafana has no Debian package: it runs only where its image is here or can be pulled.
services=()  # all of them
lb_services=()
if ! docker image inspect "$GRAFANA_IMAGE" >/dev/null 2>&1 && ! timeout 300 docker pull -q "$GRAFANA_IMAGE" >/dev/null 2>&1
then
  say "NOTE: $GRAFANA_IMAGE cannot be had here (no registry): starting siam-cpu and prometheus only"
  services=(siam-cpu prometheus)
  lb_services=(siam-cpu prometheus nginx)
fi

# --- the stack --------------------------------------------------------------------------------------
say "up: ${compose[*]} up -d ${services[*]}"
stack_up=1
"${compose[@]}" up -d "${services[@]}"

wait_healthy() {  # SERVICE: every container of it healthy by the image's HEALTHCHECK (GET /health/ready)
  local deadline=$((SECONDS + timeout)) cid state
  for cid in $("${compose[@]}" ps -q "$1"); do
    while state="$(docker inspect --format '{{.State.Health.Status}}' "$cid")"; [[ "$state" != healthy ]]; do
      [[ "$state" == unhealthy ]] && fail "container $cid is unhealthy"
      ((SECONDS < deadline)) || fail "container $cid not healthy after ${timeout}s (state: $state)"
      sleep 2
    done
  done
}
host_port() { "${compose[@]}" port "$1" "$2" | head -1 | sed 's/.*://'; }

wait_healthy siam-cpu
siam="http://127.0.0.1:$(host_port siam-cpu 8000)"
prometheus="http://127.0.0.1:$(host_port prometheus 9090)"
say "service healthy at $siam"

# A real CIFAR-10 test image (a cat: label 3) through the container, then its true label as feedback.
tar -xzf "$data" -C "$work" test/cat/0000.jpg
answer="$(curl -sf -X POST "$siam/predict?samples=16" -H 'Content-Type: image/jpeg' \
  --data-binary @"$work/test/cat/0000.jpg")" || fail "POST /predict"
id="$(echo "$answer" | python3 -c "import json, sys
a = json.load(sys.stdin)
assert len(a['probabilities']) == 10 and 0 <= a['label'] < 10, a
print(a['id'])")" || fail "bad answer: $answer"
say "prediction: $answer"
curl -sf -X POST "$siam/feedback" -H 'Content-Type: application/json' -d "{\"id\": \"$id\", \"label\": 3}" \
  >/dev/null || fail "POST /feedback"
curl -sf "$siam/v2/health/ready" >/dev/null || fail "GET /v2/health/ready (KServe v2)"

promql() {  # EXPR: the first value of an instant query, or "none"
  curl -sf --get "$prometheus/api/v1/query" --data-urlencode "query=$1" |
    python3 -c "import json, sys; r = json.load(sys.stdin)['data']['result']; print(r[0]['value'][1] if r else 'none')"
}
wait_promql() {  # EXPR EXPECTED
  local deadline=$((SECONDS + 90)) value
  until value="$(promql "$1" 2>/dev/null)" && [[ "$value" == "$2" ]]; do
    ((SECONDS < deadline)) || fail "Prometheus: $1 = ${value:-error}, expected $2"
    sleep 2
  done
  say "Prometheus: $1 = $value"
}
wait_promql 'up{job="siam"}' 1
wait_promql 'sum(siam_predictions_total)' 1
wait_promql 'sum(siam_feedback_total)' 1
wait_promql 'count(siam_model_info{backend!=""})' 1
wait_promql 'count(ALERTS{alertname=~"SiamDown|SiamAbsent"})' none
# Every alert and recording rule loaded and evaluated at least once without error. A rule reports health
# "unknown" until its group's first evaluation (interval 15 s), so poll with a bound; "err" fails at once.
rules_health() {  # prints "LOADED OK PENDING" and, per failing rule, "err NAME: LASTERROR"
  curl -sf "$prometheus/api/v1/rules" | python3 -c "import json, sys
rules = [r for g in json.load(sys.stdin)['data']['groups'] for r in g['rules']]
health = [r.get('health', 'unknown') for r in rules]
print(len(rules), health.count('ok'), health.count('unknown'))
for r in rules:
    if r.get('health') == 'err':
        print('err', r['name'] + ':', r.get('lastError', ''))"
}
deadline=$((SECONDS + 90))
while :; do
  rules="$(rules_health)" || rules="0 0 0"
  read -r loaded ok pending <<<"$(head -1 <<<"$rules")"
  grep -q '^err ' <<<"$rules" && fail "Prometheus rules with errors: $(grep '^err ' <<<"$rules" | tr '\n' ';')"
  ((loaded >= 8 && ok == loaded)) && break
  ((SECONDS < deadline)) || fail "Prometheus rules: $loaded loaded, $ok healthy, $pending not evaluated after 90 s"
  sleep 2
done
say "Prometheus: $loaded alert and recording rules loaded, all evaluated and healthy"

# --- scaling out: two replicas behind nginx (profile scale), each scraped by Prometheus, each with two
# HTTP worker processes in front of its model process (SIAM_WORKERS=2: the metrics of a replica's
# processes are summed in what Prometheus scrapes) -------------------------------------------------------
if [[ "${SIAM_SMOKE_SCALE:-1}" == 1 ]]; then
  export SIAM_FEEDBACK_SECRET="smoke-test-secret-shared-by-the-replicas"
  say "scale: SIAM_FEEDBACK_SECRET=... SIAM_WORKERS=2 SIAM_PUBLISH=8000 ${compose[*]} --profile scale up -d --scale siam-cpu=2 ${lb_services[*]}"
  SIAM_WORKERS=2 SIAM_PUBLISH=8000 "${compose[@]}" --profile scale up -d --scale siam-cpu=2 "${lb_services[@]}"
  wait_healthy siam-cpu
  "${compose[@]}" exec -T nginx nginx -s reload  # nginx resolves the replicas when it (re)loads
  lb="http://127.0.0.1:$(host_port nginx 8080)"
  deadline=$((SECONDS + 60))  # the reload takes effect when nginx's new workers are up: poll for it
  until curl -sf "$lb/health/ready" >/dev/null; do
    ((SECONDS < deadline)) || fail "nginx at $lb not answering /health/ready after 60 s"
    sleep 1
  done
  for _ in $(seq 8); do
    curl -sf -X POST "$lb/predict?samples=4" -H 'Content-Type: image/jpeg' \
      --data-binary @"$work/test/cat/0000.jpg" >/dev/null || fail "POST /predict through nginx"
  done
  say "8 predictions through nginx at $lb"
  wait_promql 'count(up{job="siam"} == 1)' 2
  wait_promql 'count(sum by (instance) (siam_predictions_total) > 0)' 2
  for cid in $("${compose[@]}" ps -q siam-cpu); do  # a supervisor, a model process and two workers in each
    processes="$(docker top "$cid" -o pid,args | grep -c python)"
    ((processes >= 4)) || fail "container $cid runs $processes Python processes, expected 4 with SIAM_WORKERS=2"
  done
  say "each replica runs two HTTP workers in front of its model process"
  # Feedback across replicas: an answer of the first takes its feedback at the second (the shared secret),
  # and only once: the first refuses it then (the feedback file on the shared volume).
  one="http://127.0.0.1:$("${compose[@]}" port --index=1 siam-cpu 8000 | sed 's/.*://')"
  two="http://127.0.0.1:$("${compose[@]}" port --index=2 siam-cpu 8000 | sed 's/.*://')"
  [[ "$one" != "$two" ]] || fail "both replicas published on $one"
  id="$(curl -sf -X POST "$one/predict?samples=4" -H 'Content-Type: image/jpeg' --data-binary @"$work/test/cat/0000.jpg" |
    python3 -c "import json, sys; print(json.load(sys.stdin)['id'])")" || fail "POST /predict at $one"
  status="$(curl -s -o /dev/null -w '%{http_code}' -X POST "$two/feedback" -H 'Content-Type: application/json' \
    -d "{\"id\": \"$id\", \"label\": 3}")"
  [[ "$status" == 200 ]] || fail "feedback at the second replica for the first's answer: HTTP $status, expected 200"
  status="$(curl -s -o /dev/null -w '%{http_code}' -X POST "$one/feedback" -H 'Content-Type: application/json' \
    -d "{\"id\": \"$id\", \"label\": 3}")"
  [[ "$status" == 404 ]] || fail "a second feedback at the first replica: HTTP $status, expected 404 (already counted)"
  say "feedback for one replica's answer taken at the other, and refused the second time (shared file)"
fi
