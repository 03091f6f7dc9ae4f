# Shared by the scripts of scripts/ and bench/.

# Installs the Debian packages named, when their command is missing.
# Usage: need_packages cmd:package ...
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

# A free TCP port on 127.0.0.1; with "low", one below 1024 (80 when free),
# which only a process allowed to bind such ports can take.
free_port() {
  python3 - "${1:-}" <<'PY'
import random, socket, sys
low = sys.argv[1] == "low"
ports = [80] + random.sample(range(600, 1000), 100) if low else [0]
for p in ports:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        print(s.getsockname()[1])
        break
    except OSError:
        pass
    finally:
        s.close()
PY
}
