{{/*
Names. The release's full name is kept short: StatefulSet pods of shard 12 of IDENT are
"<fullname>-ident-shard-12-<ordinal>", and label values stop at 63 characters.
*/}}
{{- define "fedprint.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" -}}
{{- else if contains "fedprint" .Release.Name -}}
{{- .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-fedprint" .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "fedprint.labels" -}}
app.kubernetes.io/name: fedprint
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "fedprint.commonLabels" . }}
{{- end -}}

{{/* The labels of every object that no selector uses (pod templates add the selector labels). */}}
{{- define "fedprint.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedprint
{{- end -}}

{{/*
Selector labels of one component: (dict "ctx" $ "component" "shard" "node" "iafis" "shard" 0).
"node" and "shard" are optional.
*/}}
{{- define "fedprint.selectorLabels" -}}
app.kubernetes.io/name: fedprint
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- if .node }}
fedprint.io/node: {{ .node }}
{{- end }}
{{- if hasKey . "shard" }}
fedprint.io/shard: {{ .shard | quote }}
{{- end }}
{{- end -}}

{{/* The image of a component: (dict "ctx" $ "cuda" true). */}}
{{- define "fedprint.image" -}}
{{- $image := ternary .ctx.Values.cudaImage .ctx.Values.image (default false .cuda) -}}
{{- printf "%s:%s" $image.repository (default .ctx.Chart.AppVersion $image.tag) -}}
{{- end -}}

{{- define "fedprint.pullPolicy" -}}
{{- $image := ternary .ctx.Values.cudaImage .ctx.Values.image (default false .cuda) -}}
{{- $image.pullPolicy -}}
{{- end -}}

{{/* The Secret and key holding one service's database URL. */}}
{{/* The ConfigMap holding the CA's revocation list (crl.pem); optional. */}}
{{- define "fedprint.crlConfigMap" -}}
{{- .Values.tls.crlConfigMap | default (printf "%s-crl" (include "fedprint.fullname" .)) -}}
{{- end -}}

{{- define "fedprint.databaseSecret" -}}
{{- if .Values.postgresql.enabled -}}
{{- printf "%s-database" (include "fedprint.fullname" .) -}}
{{- else -}}
{{- .Values.externalDatabase.existingSecret -}}
{{- end -}}
{{- end -}}

{{/*
Settings every service gets from the chart (fedprint.settings.ServiceSettings): where it
listens, serves health and metrics, keeps data, finds its TLS files and its database URL.
Secrets are files named here, never values: (dict "ctx" $ "identity" "iafis" "database" "iafis").
*/}}
{{- define "fedprint.baseConfig" -}}
{{- $v := .ctx.Values -}}
{{- $cfg := dict
  "listen" (printf "%s:%d" $v.bindAddress (int $v.ports.grpc))
  "health_listen" (printf "%s:%d" $v.bindAddress (int $v.ports.health))
  "data_dir" "/var/lib/fedprint"
  "log_level" $v.logLevel
-}}
{{- if .database -}}
{{- $_ := set $cfg "database_url_file" "/etc/fedprint/database/url" -}}
{{- end -}}
{{- if $v.metrics.enabled -}}
{{- $_ := set $cfg "metrics_listen" (printf "%s:%d" $v.bindAddress (int $v.ports.metrics)) -}}
{{- end -}}
{{- if $v.tracing.endpoint -}}
{{- $_ := set $cfg "tracing" (dict "exporter" "otlp" "endpoint" $v.tracing.endpoint "insecure" $v.tracing.insecure "sample_ratio" $v.tracing.sampleRatio) -}}
{{- end -}}
{{- if $v.insecure -}}
{{- $_ := set $cfg "insecure" true -}}
{{- else -}}
{{- $_ := set $cfg "tls" (dict
  "ca" "/etc/fedprint/tls/ca.pem"
  "cert" (printf "/etc/fedprint/tls/%s.pem" .identity)
  "key" (printf "/etc/fedprint/tls/%s.key" .identity)
  "crl" "/etc/fedprint/crl/crl.pem") -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* A service's config.yaml: the operator's settings under the chart's (the chart's win). */}}
{{- define "fedprint.config" -}}
{{- $base := include "fedprint.baseConfig" . | fromYaml -}}
{{- $extra := .extra | default dict | deepCopy -}}
{{- toYaml (mergeOverwrite $extra $base) -}}
{{- end -}}

{{- define "fedprint.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser | int }}
runAsGroup: {{ .Values.securityContext.runAsGroup | int }}
fsGroup: {{ .Values.securityContext.runAsGroup | int }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "fedprint.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Pod annotations: metrics scraping and a checksum of the config, so a change rolls the pods. */}}
{{- define "fedprint.podAnnotations" -}}
checksum/config: {{ .config | sha256sum }}
{{- if .ctx.Values.metrics.enabled }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .ctx.Values.ports.metrics | int | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* Container ports: gRPC, plaintext health, metrics. */}}
{{- define "fedprint.containerPorts" -}}
- name: grpc
  containerPort: {{ .Values.ports.grpc | int }}
  protocol: TCP
- name: health
  containerPort: {{ .Values.ports.health | int }}
  protocol: TCP
{{- if .Values.metrics.enabled }}
- name: metrics
  containerPort: {{ .Values.ports.metrics | int }}
  protocol: TCP
{{- end }}
{{- end -}}

{{/*
Probes on the plaintext health port (Kubernetes' gRPC probes speak no TLS). Readiness asks
for the service itself (NOT_SERVING while it stops), liveness for the server as a whole; the
startup probe gives a slow start (a shard loading its gallery) time before liveness counts.
(dict "ctx" $ "service" "fedprint.booking.v1.BookingService" "startup" .startupProbe)
*/}}
{{- define "fedprint.probes" -}}
{{- $port := .ctx.Values.ports.health | int -}}
startupProbe:
  grpc:
    port: {{ $port }}
  periodSeconds: {{ .startup.periodSeconds | int }}
  failureThreshold: {{ .startup.failureThreshold | int }}
readinessProbe:
  grpc:
    port: {{ $port }}
    service: {{ .service }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  grpc:
    port: {{ $port }}
  periodSeconds: 10
  failureThreshold: 3
  timeoutSeconds: 5
{{- end -}}

{{/* Environment every fedprint container shares: no cache writes outside the writable mounts. */}}
{{- define "fedprint.env" -}}
- name: HOME
  value: /tmp
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Volume mounts and volumes: config, TLS files of the identity, database URL, a writable /tmp,
and the data directory (an emptyDir unless the caller mounts a claim there).
(dict "ctx" $ "config" "<configmap>" "identity" "iafis" "database" "iafis" "extraMounts" list)
*/}}
{{- define "fedprint.volumeMounts" -}}
- name: config
  mountPath: /etc/fedprint/config.yaml
  subPath: config.yaml
  readOnly: true
{{- if not .ctx.Values.insecure }}
- name: tls
  mountPath: /etc/fedprint/tls
  readOnly: true
- name: crl
  mountPath: /etc/fedprint/crl
  readOnly: true
{{- end }}
{{- if .database }}
- name: database
  mountPath: /etc/fedprint/database
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /var/lib/fedprint
{{- with .extraMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "fedprint.volumes" -}}
- name: config
  configMap:
    name: {{ .config }}
{{- if not .ctx.Values.insecure }}
- name: tls
  secret:
    secretName: {{ index .ctx.Values.tls.secrets .identity }}
    defaultMode: 0400
    items:
      - {key: ca.pem, path: ca.pem}
      - {key: {{ printf "%s.pem" .identity }}, path: {{ printf "%s.pem" .identity }}}
      - {key: {{ printf "%s.key" .identity }}, path: {{ printf "%s.key" .identity }}}
# Not a subPath: the kubelet updates a mounted ConfigMap in place, and the services re-read it.
- name: crl
  configMap:
    name: {{ include "fedprint.crlConfigMap" .ctx }}
    optional: true
    items:
      - {key: crl.pem, path: crl.pem}
{{- end }}
{{- if .database }}
- name: database
  secret:
    secretName: {{ include "fedprint.databaseSecret" .ctx }}
    defaultMode: 0400
    items:
      - {key: {{ .database }}, path: url}
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- if not .dataClaim }}
- name: data
  emptyDir:
    sizeLimit: 1Gi
{{- end }}
{{- with .extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Scheduling: node selector, tolerations, affinity of a component. */}}
{{- define "fedprint.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
