# Shared by scripts/run and scripts/test: installs the Debian packages named,
# when their command is missing. Usage: need_packages cmd:package ...
need_packages() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing ${missing[*]} (apt-get)" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Installs the Debian packages named when Debian's Python 3 (/usr/bin/python3,
# which the tests use, whatever else is on PATH) lacks their module.
# Usage: need_python_modules module:package ...
need_python_modules() {
  local pair
  for pair in "$@"; do
    /usr/bin/python3 -c "import ${pair%%:*}" >/dev/null 2>&1 ||
      need_packages "__missing_module_${pair%%:*}:${pair#*:}"
  done
}
