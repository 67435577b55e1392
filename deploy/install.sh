#!/usr/bin/env bash
# Installs what vgate needs, the same way for `make` and the Dockerfile:
#   nginx (and Python, where the base has none) from the system packages, then the
#   project into a Python environment.
#
# usage: deploy/install.sh [--venv DIR] [--extras LIST] [--no-editable]
#   --venv DIR     create/use a virtualenv at DIR (default: .venv); "system" installs
#                  into the current python (the GPU image, where vLLM comes with the base)
#   --extras LIST  pip extras, comma separated: cpu (vLLM's CPU build), test
#   --no-editable  install a copy (the image), not a link to this checkout (make)
#   --system-only  the system packages alone (the image's first, rarely rebuilt layer)
# pip's own variables (PIP_FIND_LINKS, PIP_NO_INDEX) reach pip: `make image` points
# them at the wheels it downloaded once.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
extras=""
editable="-e"
system_only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv="$2"; shift 2 ;;
    --extras) extras="$2"; shift 2 ;;
    --no-editable) editable=""; shift ;;
    --system-only) system_only=1; shift ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

# nginx, its njs module (it checks --api-key in constant time), its Lua module (it
# counts the front door's requests for /metrics and, with lua-cjson to read request
# bodies, routes by prompt prefix); Python and venv on a bare base (the CPU image's Debian).
packages=()
if { ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; } \
    || [ ! -f /usr/lib/nginx/modules/ngx_http_js_module.so ] \
    || [ ! -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] \
    || ! compgen -G "/usr/lib/*/lua/5.1/cjson.so" >/dev/null; then
  packages+=(nginx libnginx-mod-http-js libnginx-mod-http-lua lua-cjson)
fi
# The tests run a real Prometheus server and promtool (alert rules and their tests).
if [[ ",$extras," == *",test,"* ]] && ! command -v promtool >/dev/null 2>&1; then
  packages+=(prometheus)
fi
command -v python3 >/dev/null 2>&1 || packages+=(python3 ca-certificates)
# vLLM's CPU build links libnuma, and torch.compile (its CPU default) builds its
# kernels with g++ against Python's headers, as vLLM's own CPU image has them.
if [[ ",$extras," == *",cpu,"* ]]; then
  ldconfig -p 2>/dev/null | grep -q libnuma.so.1 || packages+=(libnuma1)
  command -v g++ >/dev/null 2>&1 || packages+=(g++)
  python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
    2>/dev/null || packages+=(python3-dev)
fi
if [ "$venv" != "system" ] && [ ! -x "$venv/bin/python" ] \
    && ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
  packages+=(python3-venv)
fi
if [ ${#packages[@]} -gt 0 ]; then
  echo "install.sh: installing ${packages[*]} from the system packages"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  if [[ " ${packages[*]} " == *" libnginx-mod-http-js "* ]] \
      && ! apt-cache show libnginx-mod-http-js >/dev/null 2>&1; then
    # Older releases (Ubuntu 22.04) have no njs package: vgate serves, but --api-key
    # then stops it at start with the reason.
    echo "install.sh: no libnginx-mod-http-js here: --api-key will not be available" >&2
    packages=("${packages[@]/libnginx-mod-http-js}")
  fi
  if [[ " ${packages[*]} " == *" libnginx-mod-http-lua "* ]] \
      && ! apt-cache show libnginx-mod-http-lua >/dev/null 2>&1; then
    echo "install.sh: no libnginx-mod-http-lua here: /metrics will not count the front door," \
      "and routing is by load alone" >&2
    packages=("${packages[@]/libnginx-mod-http-lua}")
    packages=("${packages[@]/lua-cjson}")
  fi
  # shellcheck disable=SC2068  # unquoted: the entry emptied above must vanish
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    ${packages[@]} >/dev/null
  # Debian starts the packaged services; vgate runs its own nginx, the tests their own
  # Prometheus.
  $sudo service nginx stop >/dev/null 2>&1 || true
  $sudo service prometheus stop >/dev/null 2>&1 || true
fi
[ -z "$system_only" ] || exit 0

if [ "$venv" = "system" ]; then
  python=python3
  # The image's Python belongs to the image: installing into it is the point.
  export PIP_BREAK_SYSTEM_PACKAGES=1
else
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  python="$venv/bin/python"
fi

spec="$root"
[ -z "$extras" ] || spec="$root[$extras]"
# shellcheck disable=SC2086  # $editable: one flag or none
"$python" -m pip install --quiet --disable-pip-version-check $editable "$spec"

if [[ ",$extras," == *",cpu,"* ]]; then
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break
  # `import transformers` beside the CPU torch; text models need none of them.
  "$python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$python" -c "import vllm, transformers" 2>/dev/null \
    || { echo "install.sh: vllm/transformers do not import in $python" >&2; exit 1; }
fi
echo "install.sh: ready ($python)"
