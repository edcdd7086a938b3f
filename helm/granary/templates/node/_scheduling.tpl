{{/* Scheduling shared by the two node DaemonSets: they must land on the same nodes. */}}
{{- define "granary.nodeScheduling" -}}
serviceAccountName: {{ include "granary.nodeName" . }}
automountServiceAccountToken: false
priorityClassName: {{ .Values.node.priorityClassName }}
{{- with .Values.node.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.node.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.node.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
