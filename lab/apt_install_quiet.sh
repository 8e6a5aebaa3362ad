#!/bin/bash
# Install Debian packages for the tests without starting the services they ship.
#
# Why: Debian starts a package's daemon when it is installed. Several programs the tests run
# (in network namespaces they create) would otherwise also run on the host, on the host's
# network: tor would join the Tor network, yggdrasil peer over multicast, xl2tpd and
# shadowsocks-libev listen on every address. A policy-rc.d that refuses every start (Debian
# policy 9.3.3, honoured by invoke-rc.d and deb-systemd-invoke) covers the install; the
# services of the packages this call installed are then disabled, so they do not start at the
# next boot either. Packages that were installed before are not touched, nor are their
# services: they are the machine owner's.
#
# Usage: lab/apt_install_quiet.sh PACKAGE...   (as root; apt-get update is the caller's)
set -euo pipefail

new=()
for p in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
        new+=("$p")
    fi
done
if [ ${#new[@]} -eq 0 ]; then
    exit 0
fi

guard=/usr/sbin/policy-rc.d
made=0
if [ ! -e "$guard" ]; then
    printf '#!/bin/sh\n# written by egressd lab/apt_install_quiet.sh for one apt-get run\nexit 101\n' > "$guard"
    chmod 755 "$guard"
    made=1
fi
cleanup() { if [ "$made" = 1 ]; then rm -f "$guard"; fi; }
trap cleanup EXIT

DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${new[@]}"

for p in "${new[@]}"; do
    while read -r path; do
        name=$(basename "$path")
        case "$path" in
            */systemd/system/*@.service) ;;  # templates run only when an instance is asked for
            */systemd/system/*.service)
                if [ -d /run/systemd/system ]; then systemctl disable "$name" >/dev/null 2>&1 || true; fi ;;
            /etc/init.d/*)
                if command -v update-rc.d >/dev/null; then update-rc.d "$name" disable >/dev/null 2>&1 || true; fi ;;
        esac
    done < <(dpkg -L "$p" 2>/dev/null | grep -E '^(/usr)?/lib/systemd/system/[^/]+\.service$|^/etc/init\.d/[^/]+$' || true)
done
