{{/*
Names and labels shared by every template.
The operator's own objects carry app.kubernetes.io/name=dapo-operator, never "dapo": the run pods
are labelled app.kubernetes.io/name=dapo and the run-pod NetworkPolicy selects on that label.
*/}}

{{- define "dapo.name" -}}
{{- default "dapo-operator" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dapo.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains "operator" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dapo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dapo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dapo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dapo.labels" -}}
helm.sh/chart: {{ include "dapo.chart" . }}
{{ include "dapo.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: dapo
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "dapo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dapo.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dapo.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "dapo.runtimeImage" -}}
{{- printf "%s:%s" .Values.runtimeImage.repository (default .Chart.AppVersion .Values.runtimeImage.tag) -}}
{{- end -}}

{{/* Namespaces the operator watches in namespaced scope (the release namespace by default). */}}
{{- define "dapo.watchNamespaces" -}}
{{- if .Values.rbac.watchNamespaces -}}
{{- toJson .Values.rbac.watchNamespaces -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{/* Namespaces that get the run-pod NetworkPolicy. */}}
{{- define "dapo.runNamespaces" -}}
{{- if eq .Values.rbac.scope "namespaced" -}}
{{- include "dapo.watchNamespaces" . -}}
{{- else if .Values.networkPolicy.runPods.namespaces -}}
{{- toJson .Values.networkPolicy.runPods.namespaces -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{/*
The operator's permissions on namespaced resources, identical in both scopes (only the binding
kind differs). Least privilege, no wildcards:
- daporuns: kopf lists/watches them and patches finalizers, progress annotations and status;
  the operator deletes a finished run after spec.ttlSecondsAfterFinished.
- pods: watched (failures trigger restarts), created, deleted on suspend / gang restart.
- services, configmaps: listed and created once per run (the run-file ConfigMap is patched when the
  DAPORun is edited); the garbage collector deletes them
  through ownerReferences. The operator never reads Secrets: run pods get S3 credentials
  through secretKeyRef, resolved by the kubelet.
- events: kopf posts core v1 events.
Nothing cluster-scoped: the operator disables kopf's scanning (settings.scanning.disabled), so it
never lists namespaces or watches CustomResourceDefinitions, and runs standalone (no peering).
*/}}
{{- define "dapo.namespacedRules" -}}
- apiGroups: ["dapo.dev"]
  resources: ["daporuns"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["dapo.dev"]
  resources: ["daporuns/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "create"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["list", "create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
