# Sourced by the launcher scripts: a setting given both as an environment variable and as its command-line flag is
# refused, naming both (one meaning however it is given; README "Troubleshooting"). A flag without the variable
# simply wins over the launcher's default.
#
#   source scripts/env_and_flags.sh
#   refuse_env_and_flag VAR --flag "$@"
refuse_env_and_flag() {
  local var="$1" flag="$2" arg
  shift 2
  [ -n "${!var+set}" ] || return 0
  for arg in "$@"; do
    if [ "$arg" = "$flag" ] || [ "${arg%%=*}" = "$flag" ]; then
      echo "error: $var=${!var} and $flag are both given; give one (the variable, or the flag)" >&2
      exit 2
    fi
  done
}
