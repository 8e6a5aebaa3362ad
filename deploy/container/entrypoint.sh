#!/bin/sh
# The image's `egressd` (ENTRYPOINT, and what the probes run): egressd as the non-root user
# "egressd" (65532) holding, as ambient capabilities, exactly the capabilities the container was
# given among those egressd uses — what systemd's User= + AmbientCapabilities= do on a host.
#
# Why a wrapper: container runtimes give capabilities to uid 0 only (Kubernetes cannot set
# ambient capabilities), and a non-root process cannot gain them except through file
# capabilities, which allowPrivilegeEscalation: false (no_new_privs) ignores, and which would
# not reach the iptables that egressd runs. So the container starts as uid 0 with every
# capability dropped but these, and this script hands them to the egressd user with setpriv;
# SETUID/SETGID/SETPCAP, needed for that switch, are left out of every set of the daemon.
set -eu
EGRESSD=/opt/egressd/bin/egressd
if [ "$(id -u)" != 0 ]; then
    exec "$EGRESSD" "$@"
fi
# The capabilities egressd uses by default (docs/attribution.md measures each one): NET_ADMIN
# (rules, queue, conntrack events), SYS_PTRACE and DAC_READ_SEARCH (naming the process behind a
# flow; both only read). EGRESSD_EXTRA_CAPS adds opt-in ones: sys_admin (pods with their own
# network namespace), kill / dac_override (respond: kill|freeze), net_raw (iptables-legacy).
# Only those the container really holds are passed on: a pod spec that leaves SYS_PTRACE out
# gets events without process names, never a failed start; one that grants more (a runtime's
# default set) does not hand the extras to egressd.
held=$(setpriv --dump | sed -n 's/^Capability bounding set: //p')
caps=""
for c in net_admin sys_ptrace dac_read_search $(echo "${EGRESSD_EXTRA_CAPS:-}" | tr ',' ' '); do
    case ",$held," in *",$c,"*) caps="$caps,+$c" ;; esac
done
caps=${caps#,}
exec setpriv --reuid=egressd --regid=egressd --clear-groups \
    --inh-caps="-all${caps:+,$caps}" --ambient-caps="-all${caps:+,$caps}" \
    --bounding-set="-all${caps:+,$caps}" -- "$EGRESSD" "$@"
