#!/usr/bin/env bash
# The suite on other versions of Ray, torch or torchvision, each set in a venv of its own
# (.venv-versions/NAME), the project's other pins from constraints.txt. README, "Tested versions".
#
#   scripts/test_versions.sh NAME PIN... [-- PYTEST ARGS]
#   scripts/test_versions.sh ray2.58 "ray[tune,default]==2.58.1" -- -m ray tests/tune
#   scripts/test_versions.sh torch-old torch==2.X torchvision==0.Y -- tests/engine tests/models
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 NAME PIN... [-- PYTEST ARGS]" >&2; exit 2; }
name=$1; shift
pins=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do pins+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
venv=.venv-versions/$name
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# constraints.txt less the packages this set pins itself.
others=$(mktemp)
trap 'rm -f "$others"' EXIT
names=$(printf '%s\n' "${pins[@]}" | sed -E 's/[[<>=!~; ].*//' | tr 'A-Z_' 'a-z-')
grep -v -i -E "^($(echo $names | tr ' ' '|'))([<>=!~; []|$)" constraints.txt > "$others"
# The project without its declared bounds (a set may lie outside them: that is the question),
# its other dependencies and test tools at constraints.txt's pins.
# Ray's and moto's extras (the dashboard, Tune; the S3 test server): constraints.txt pins
# only the packages' versions.
"$venv/bin/python" -m pip install --quiet "${pins[@]}" -r "$others" "ray[tune,default]" \
    "moto[server]"
"$venv/bin/python" -m pip install --quiet --no-deps -e .
"$venv/bin/python" -c "import ray, torch, torchvision; print('testing on ray', ray.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__)"
# Deselected: the one test whose premise is a venv holding constraints.txt's pins (a node
# image baked from them downloads nothing), which a venv of other versions is not.
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    --deselect tests/test_cluster_yaml.py::test_a_node_whose_image_holds_the_pins_downloads_nothing "$@"
