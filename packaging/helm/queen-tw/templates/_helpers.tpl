{{/* Names and labels shared by every object of the chart. */}}

{{- define "queen-tw.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "queen-tw.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "queen-tw.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "queen-tw.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The headless Service that gives each pod a stable DNS name for the UDP peer sync. */}}
{{- define "queen-tw.peersService" -}}
{{- printf "%s-peers" (include "queen-tw.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "queen-tw.selectorLabels" -}}
app.kubernetes.io/name: {{ include "queen-tw.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "queen-tw.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "queen-tw.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "queen-tw.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "queen-tw.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
QUEEN_UDP_PEERS: every pod of the StatefulSet by its DNS name under the headless Service,
host:port, itself included (an instance ignores its own datagrams). A pod not started yet
does not resolve; the server keeps the name and retries it every 30 s.
*/}}
{{- define "queen-tw.udpPeers" -}}
{{- $fullname := include "queen-tw.fullname" . -}}
{{- $domain := printf "%s.%s.svc.%s" (include "queen-tw.peersService" .) .Release.Namespace .Values.clusterDomain -}}
{{- $peers := list -}}
{{- range $i := until (int .Values.replicaCount) -}}
{{- $peers = append $peers (printf "%s-%d.%s:%d" $fullname $i $domain (int $.Values.peerSync.udpPort)) -}}
{{- end -}}
{{- join "," $peers -}}
{{- end -}}

{{/* An env entry read from a Secret key; the pod does not start while the key is missing. */}}
{{- define "queen-tw.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
{{- end -}}
