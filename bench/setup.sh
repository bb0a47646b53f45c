#!/usr/bin/env bash
# Bench-only virtualenvs, next to (never inside) the project's .venv:
#   bench/.venv-letta  letta 0.16.x from PyPI, the in-process peer (with asyncpg, which its ORM
#                      imports at load time, and hiredis, the parser sse-sidecar uses too)
#   bench/.venv-tools  py-spy, for `python -m bench --profile`
# Idempotent: each is built once (a stamp names what was installed). When letta cannot be
# installed, the reason is kept in bench/.venv-letta.log and the bench runs without that peer.
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${1:-python3}
LETTA_SPEC='letta[redis]>=0.16,<0.17'
LETTA_EXTRA=(asyncpg hiredis)

if [[ ! -f .venv-letta/.installed ]]; then
  echo "bench: creating bench/.venv-letta (letta 0.16.x from PyPI; once, about a minute)"
  rm -rf .venv-letta
  if "$PYTHON" -m venv .venv-letta >.venv-letta.log 2>&1 &&
    .venv-letta/bin/python -m pip install -q --upgrade pip >>.venv-letta.log 2>&1 &&
    .venv-letta/bin/python -m pip install -q "$LETTA_SPEC" "${LETTA_EXTRA[@]}" >>.venv-letta.log 2>&1; then
    echo "$LETTA_SPEC ${LETTA_EXTRA[*]}" >.venv-letta/.installed
    rm -f .venv-letta.log
  else
    echo "bench: could not install $LETTA_SPEC; the Letta peer will be skipped (see bench/.venv-letta.log)" >&2
    rm -rf .venv-letta
  fi
fi

if [[ ! -f .venv-tools/.installed ]]; then
  echo "bench: creating bench/.venv-tools (py-spy)"
  rm -rf .venv-tools
  if "$PYTHON" -m venv .venv-tools >/dev/null 2>&1 &&
    .venv-tools/bin/python -m pip install -q py-spy >/dev/null 2>&1; then
    echo "py-spy" >.venv-tools/.installed
  else
    echo "bench: could not install py-spy; --profile will not work" >&2
    rm -rf .venv-tools
  fi
fi
exit 0
