#!/usr/bin/env bash
# Opcode histogram of one kernel's SASS in the built library: where a kernel's instructions per byte go.
#   bash bench/sass_histogram.sh <library.so> <function-name regex> [arch, default sm_90]
set -eu
lib=$1 pat=$2 arch=${3:-sm_90}
cuobjdump -sass -arch "$arch" "$lib" | awk -v pat="$pat" '
  /Function :/ { on = ($0 ~ pat) } on' >/tmp/sass_fn.txt
echo "$(grep -c '/\*[0-9a-f]*\*/' /tmp/sass_fn.txt) instructions in functions matching $pat"
grep -oE '^\s+/\*[0-9a-f]+\*/\s+(@!?U?P[0-9T] )?[A-Z0-9]+(\.[A-Z0-9_]+)*' /tmp/sass_fn.txt |
  awk '{print $NF}' | sed 's/\..*//' | sort | uniq -c | sort -rn | head -25
