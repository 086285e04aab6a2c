#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: OS packages (nginx, redis,
# wrk, chromium) when missing, then the venv with fastroute built in it. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v chromium >/dev/null 2>&1 || need+=(chromium)  # tests/test_dashboard.py (headless, via playwright)
# the distribution's optimized CPython 3.11 (see PYTHON in the Makefile) needs its venv module
if [ -x /usr/bin/python3.11 ] && ! /usr/bin/python3.11 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  need+=(python3.11-venv)
fi
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "bootstrap: installing ${need[*]}"
  $SUDO apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "${need[@]}" >/dev/null; }
fi
make -s install
