{{/* Names and labels shared by every template. */}}

{{- define "granary.fullname" -}}
{{- if contains "granary" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-granary" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "granary.labels" -}}
app.kubernetes.io/name: granary
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (list . "operator") */}}
{{- define "granary.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: granary
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "granary.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "granary.operatorName" -}}{{ include "granary.fullname" . }}-operator{{- end -}}
{{- define "granary.webhookService" -}}{{ include "granary.fullname" . }}-webhook{{- end -}}
{{- define "granary.webhookConfiguration" -}}{{ include "granary.fullname" . }}{{- end -}}
{{- define "granary.webhookSecret" -}}{{ include "granary.fullname" . }}-webhook-tls{{- end -}}
{{- define "granary.volumeKeySecret" -}}{{ default (printf "%s-volume-key" (include "granary.fullname" .)) .Values.volumeKey.existingSecret }}{{- end -}}
{{- define "granary.csiName" -}}{{ include "granary.fullname" . }}-csi{{- end -}}
{{- define "granary.nodeName" -}}{{ include "granary.fullname" . }}-node{{- end -}}

{{- define "granary.logEnv" -}}
- name: GRANARY_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: GRANARY_LOG
  value: {{ .Values.logLevel | quote }}
{{- end -}}
