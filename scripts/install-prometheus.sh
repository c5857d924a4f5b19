#!/usr/bin/env bash
# Installs Debian's prometheus package (the dashboard tests query a real Prometheus) when it is
# missing. Needs root and apt; elsewhere it says so and the dashboard test is skipped.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[prometheus] not installed and cannot install it here (needs root and apt-get)" >&2
  exit 1
fi
echo "[prometheus] installing Debian's prometheus package"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package may start a system service on :9090; the tests run their own on a free port.
(command -v service >/dev/null && service prometheus stop >/dev/null 2>&1) || true
pkill -x prometheus 2>/dev/null || true
