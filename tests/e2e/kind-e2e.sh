#!/usr/bin/env bash
# End-to-end test on a throw-away kind cluster: build the images, install the chart, train a tiny
# CPU run, wait for it to succeed, dump what happened. Needs docker, kind, kubectl and helm.
# Not run in CI (no Docker engine there); see tests/e2e/README.md.
#
#   tests/e2e/kind-e2e.sh            # create cluster, run, delete cluster
#   KEEP_CLUSTER=1 tests/e2e/kind-e2e.sh
set -euo pipefail

CLUSTER="${CLUSTER:-dapo-e2e}"
NAMESPACE="${NAMESPACE:-dapo-system}"
RUN_NAMESPACE="${RUN_NAMESPACE:-dapo-runs}"
TAG="${TAG:-e2e}"
TIMEOUT_S="${TIMEOUT_S:-1800}"
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
OUT_DIR="${OUT_DIR:-runs/e2e}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN_FILE="${ROOT}/examples/gitops/runs/arith-tiny.yaml"
RUN_NAME="arith-tiny"

log() { printf '[kind-e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

need() {
  command -v "$1" >/dev/null 2>&1 || { log "missing tool: $1 ($2)"; exit 2; }
}

dump_state() {
  mkdir -p "${ROOT}/${OUT_DIR}"
  log "writing cluster state to ${OUT_DIR}/"
  kubectl -n "${RUN_NAMESPACE}" get daporuns -o wide >"${ROOT}/${OUT_DIR}/daporuns.txt" 2>&1 || true
  kubectl -n "${RUN_NAMESPACE}" get daporun "${RUN_NAME}" -o yaml >"${ROOT}/${OUT_DIR}/daporun.yaml" 2>&1 || true
  kubectl -n "${RUN_NAMESPACE}" get pods,svc,configmaps -o wide >"${ROOT}/${OUT_DIR}/children.txt" 2>&1 || true
  kubectl -n "${RUN_NAMESPACE}" get events --sort-by=.lastTimestamp >"${ROOT}/${OUT_DIR}/events.txt" 2>&1 || true
  kubectl -n "${NAMESPACE}" logs deployment/dapo-operator --tail=500 >"${ROOT}/${OUT_DIR}/operator.log" 2>&1 || true
  local pod
  for pod in $(kubectl -n "${RUN_NAMESPACE}" get pods -l "dapo.dev/run=${RUN_NAME}" -o name 2>/dev/null); do
    kubectl -n "${RUN_NAMESPACE}" logs "${pod}" --tail=300 >"${ROOT}/${OUT_DIR}/${pod#pod/}.log" 2>&1 || true
  done
}

cleanup() {
  local rc=$?
  dump_state
  if [[ "${KEEP_CLUSTER}" != "1" ]]; then
    log "deleting kind cluster ${CLUSTER}"
    kind delete cluster --name "${CLUSTER}" >/dev/null 2>&1 || true
  fi
  exit "${rc}"
}

need docker "https://docs.docker.com/engine/install/"
need kind "go install sigs.k8s.io/kind@latest"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
need helm "https://helm.sh/docs/intro/install/"
[[ -f "${ROOT}/crds/daporun.yaml" ]] || { log "crds/daporun.yaml missing: run 'dapo crd > crds/daporun.yaml'"; exit 2; }

log "building images (operator: slim stage; runtime: CPU stage)"
docker build --target operator -t "dapo-operator:${TAG}" "${ROOT}"
docker build --target runtime-cpu -t "dapo:${TAG}" "${ROOT}"

if ! kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
  log "creating kind cluster ${CLUSTER}"
  kind create cluster --name "${CLUSTER}" --wait 120s
fi
trap cleanup EXIT
kubectl config use-context "kind-${CLUSTER}" >/dev/null

log "loading images into the cluster"
kind load docker-image --name "${CLUSTER}" "dapo-operator:${TAG}" "dapo:${TAG}"

log "installing the chart (namespaced scope, watching ${RUN_NAMESPACE})"
kubectl create namespace "${RUN_NAMESPACE}" --dry-run=client -o yaml | kubectl apply -f -
helm upgrade --install dapo "${ROOT}/charts" \
  --namespace "${NAMESPACE}" --create-namespace \
  --set image.tag="${TAG}" --set image.pullPolicy=Never \
  --set runtimeImage.tag="${TAG}" \
  --set rbac.scope=namespaced --set "rbac.watchNamespaces[0]=${RUN_NAMESPACE}" \
  --set networkPolicy.enabled=true \
  --wait --timeout 5m
kubectl wait --for=condition=Established crd/daporuns.dapo.dev --timeout=60s

log "applying ${RUN_FILE#"${ROOT}"/}"
kubectl -n "${RUN_NAMESPACE}" apply -f "${RUN_FILE}"

log "waiting up to ${TIMEOUT_S}s for phase Succeeded"
deadline=$(( $(date +%s) + TIMEOUT_S ))
phase=""
while (( $(date +%s) < deadline )); do
  phase="$(kubectl -n "${RUN_NAMESPACE}" get daporun "${RUN_NAME}" -o jsonpath='{.status.phase}' 2>/dev/null || true)"
  kubectl -n "${RUN_NAMESPACE}" get daporuns --no-headers 2>/dev/null | sed 's/^/  /' >&2 || true
  case "${phase}" in
    Succeeded) break ;;
    Failed) log "run failed"; kubectl -n "${RUN_NAMESPACE}" get daporun "${RUN_NAME}" -o jsonpath='{.status.message}{"\n"}' >&2; exit 1 ;;
  esac
  sleep 10
done
[[ "${phase}" == "Succeeded" ]] || { log "timed out in phase '${phase}'"; exit 1; }

log "run succeeded; status:"
kubectl -n "${RUN_NAMESPACE}" get daporun "${RUN_NAME}" -o jsonpath='{.status}' | python3 -m json.tool >&2

step="$(kubectl -n "${RUN_NAMESPACE}" get daporun "${RUN_NAME}" -o jsonpath='{.status.step}')"
[[ "${step}" == "5" ]] || { log "status.step is '${step}', expected 5 (spec.learner.totalSteps)"; exit 1; }
log "PASS"
