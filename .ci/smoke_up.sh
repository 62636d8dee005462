#!/usr/bin/env bash
# Smoke test of the run command on the embedded default: start `fhirq up` with a temporary data
# directory and port, wait for /healthz, POST a small transaction to /fhir and check the
# transaction-response, then SIGTERM it and check that no postgres, redis-server, gunicorn or
# celery process it started is left.
#
# Runs on its own (`bash .ci/smoke_up.sh` or `make smoke`) in an environment where fhirq is
# installed; FHIRQ and PYTHON may name the command and interpreter to use.
set -euo pipefail

FHIRQ="${FHIRQ:-fhirq}"
PYTHON="${PYTHON:-python}"
START_TIMEOUT="${START_TIMEOUT:-120}"
STOP_TIMEOUT="${STOP_TIMEOUT:-60}"

work="$(mktemp -d "${TMPDIR:-/tmp}/fhirq-smoke.XXXXXX")"
data="$work/data"
log="$work/up.log"
port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
base="http://127.0.0.1:$port"
pid=""

say() { printf 'smoke: %s\n' "$*"; }

# One-letter process state ("" once gone; Z: exited, not yet reaped).
state() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1 || true; }

# SIGTERM, then wait up to STOP_TIMEOUT (bash's `wait` has no timeout, so poll the state);
# returns 1 if it had to be killed.
stop_up() {
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 5; i++)); do
        case "$(state "$pid")" in Z | "") return 0 ;; esac
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    return 1
}

show_log() {
    say "last lines of the fhirq up output:"
    tail -n 60 "$log" | sed 's/^/  | /' || true
}

# Any process whose command line or environment mentions the smoke's own directory or port:
# found by scanning, independent of fhirq's own bookkeeping.
leftovers() {
    "$PYTHON" - "$work" "$port" <<'EOF'
import sys

import psutil

work, port = sys.argv[1], sys.argv[2]
for p in psutil.process_iter(["pid", "cmdline", "status"]):
    if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == psutil.Process().pid:
        continue
    try:
        line = " ".join(p.info["cmdline"] or [])
        env = p.environ()
    except psutil.Error:
        continue
    if work in line or f"127.0.0.1:{port}" in line or env.get("FHIRQ_DATA_DIR", "").startswith(work):
        print(p.pid, line[:160])
EOF
}

cleanup() {
    status=$?
    if [ -n "$pid" ]; then
        stop_up || true
        wait "$pid" 2>/dev/null || true
    fi
    left="$(leftovers || true)"
    if [ -n "$left" ]; then
        say "killing leftovers:"; echo "$left"
        echo "$left" | awk '{print $1}' | xargs -r kill -9 2>/dev/null || true
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT

say "starting fhirq up on $base (data in $data)"
# The README's default: embedded servers, loopback, no authentication.
env -u FHIRQ_DATABASE_URL -u FHIRQ_REDIS_URL -u FHIRQ_BASE_URL -u FHIRQ_DATA_DIR -u FHIRQ_AUTH \
    "$FHIRQ" up --data-dir "$data" --port "$port" >"$log" 2>&1 &
pid=$!

if ! "$PYTHON" - "$base" "$pid" "$START_TIMEOUT" <<'EOF'
import sys
import time

import httpx
import psutil

base, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
        sys.exit("fhirq up exited before it was healthy")
    try:
        if httpx.get(f"{base}/healthz", timeout=2, trust_env=False).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
sys.exit(f"no healthy /healthz within {timeout:.0f} s")
EOF
then
    show_log
    exit 1
fi
say "healthy after $SECONDS s"

if ! "$PYTHON" - "$base" <<'EOF'
import sys

import httpx

base = sys.argv[1]
patient = "urn:uuid:0c3f4b5e-2f0a-4d8e-9a57-5b0ad2f1e001"
bundle = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {
            "fullUrl": patient,
            "resource": {"resourceType": "Patient", "name": [{"family": "Smoke", "given": ["Ci"]}]},
            "request": {"method": "POST", "url": "Patient"},
        },
        {
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "Body weight"},
                "subject": {"reference": patient},
                "valueQuantity": {"value": 72, "unit": "kg"},
            },
            "request": {"method": "POST", "url": "Observation"},
        },
    ],
}
with httpx.Client(base_url=base, timeout=30, trust_env=False) as client:
    r = client.post("/fhir", json=bundle, headers={"Content-Type": "application/fhir+json"})
    if r.status_code != 200:
        sys.exit(f"POST /fhir answered {r.status_code}: {r.text[:2000]}")
    answer = r.json()
    if answer.get("resourceType") != "Bundle" or answer.get("type") != "transaction-response":
        sys.exit(f"not a transaction-response: {r.text[:2000]}")
    statuses = [e.get("response", {}).get("status", "") for e in answer.get("entry", [])]
    if len(statuses) != 2 or not all(s.startswith("201") for s in statuses):
        sys.exit(f"expected two 201 entries, got {statuses}")
    location = answer["entry"][0]["response"]["location"]
    read = client.get(f"/fhir/{location}")
    if read.status_code != 200 or read.json().get("resourceType") != "Patient":
        sys.exit(f"GET /fhir/{location} answered {read.status_code}: {read.text[:2000]}")
print(f"smoke: transaction-response {statuses}, {location} reads back")
EOF
then
    show_log
    exit 1
fi

say "sending SIGTERM"
if ! stop_up; then
    say "fhirq up still running ${STOP_TIMEOUT} s after SIGTERM; killed"
    show_log
    exit 1
fi
status=0
wait "$pid" || status=$?
pid=""
if [ "$status" -ne 0 ]; then
    say "fhirq up exited with status $status"
    show_log
    exit 1
fi

sleep 1
left="$(leftovers)"
if [ -n "$left" ]; then
    say "processes left after fhirq up stopped:"
    echo "$left"
    exit 1
fi
say "stopped cleanly, nothing left running; passed in $SECONDS s"
