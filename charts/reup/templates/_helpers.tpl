{{/* Names and labels shared by the templates. */}}
{{- define "reup.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "reup.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "reup.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "reup.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "reup.labels" -}}
app.kubernetes.io/name: {{ include "reup.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "reup.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reup.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The Secret holding the SSH key: the user's, or <fullname>-ssh (created from ssh.privateKey, or by hand). */}}
{{- define "reup.sshSecret" -}}
{{- if and .Values.ssh.existingSecret .Values.ssh.privateKey -}}
{{- fail "set ssh.privateKey or ssh.existingSecret, not both" -}}
{{- end -}}
{{- .Values.ssh.existingSecret | default (printf "%s-ssh" (include "reup.fullname" .)) -}}
{{- end -}}

{{/* The Secret with the fleet repo's credentials (gitCredentials), or "" when there is none. */}}
{{- define "reup.gitSecret" -}}
{{- $g := .Values.gitCredentials -}}
{{- $inline := or $g.sshKey $g.knownHosts $g.username $g.password $g.token $g.caFile -}}
{{- if and $g.existingSecret $inline -}}
{{- fail "set the gitCredentials values or gitCredentials.existingSecret, not both" -}}
{{- end -}}
{{- if and $g.password $g.token -}}
{{- fail "set gitCredentials.password or gitCredentials.token, not both" -}}
{{- end -}}
{{- if $g.existingSecret -}}
{{- $g.existingSecret -}}
{{- else if $inline -}}
{{- printf "%s-git" (include "reup.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* reup.toml: .Values.config with the keys the chart owns; sections and keys in sorted order,
     scalars and lists as JSON (which TOML reads the same), nested maps as sub-tables. */}}
{{- define "reup.toml" -}}
{{- $owned := dict "state" (dict "dir" "/var/lib/reup") "ssh" (dict "key" (printf "/etc/reup/ssh/%s" .Values.ssh.key)) "http" (dict "listen" (printf "0.0.0.0:%v" .Values.service.port)) -}}
{{- if include "reup.gitSecret" . -}}
{{- $_ := set $owned "source" (dict "credentials_dir" "/etc/reup/git") -}}
{{- end -}}
{{- $config := mergeOverwrite (deepCopy .Values.config) $owned -}}
{{- range $section, $table := $config -}}
[{{ $section }}]
{{- range $key, $value := $table }}
{{- if not (kindIs "map" $value) }}
{{ $key }} = {{ toJson $value }}
{{- end }}
{{- end }}
{{- range $key, $value := $table }}
{{- if kindIs "map" $value }}
[{{ $section }}.{{ $key }}]
{{- range $k, $v := $value }}
{{ toJson $k }} = {{ toJson $v }}
{{- end }}
{{- end }}
{{- end }}

{{ end }}
{{- end -}}

{{/* PromQL matchers that scope the alerts to this release's scrape job (a ServiceMonitor's job is its Service's name). */}}
{{- define "reup.promSelector" -}}
job="{{ include "reup.fullname" . }}", namespace="{{ .Release.Namespace }}"
{{- end -}}
