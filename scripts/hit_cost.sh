#!/usr/bin/env bash
# Instructions per hit, counted by callgrind (repeatable on a loaded
# machine, where wall-clock and CPU time are not): benches/hit_cost.rs run
# twice per arm under valgrind, with 2,000 and 12,000 hits; the difference
# divided by 10,000 (set-up and warm-up cancel out).
#
#   scripts/hit_cost.sh [ARM...]      # default: naive fence fence-manager
#
# One request at a time (CONC=1, the default: repeatable to 0.3 %); CONC=8
# lets replies batch by Redis's timing (a few % between runs).
# Uses REDIS_URL (default redis://127.0.0.1:6379/); BIN=path skips the build.
set -euo pipefail
arms=("$@")
[ ${#arms[@]} -gt 0 ] || arms=(naive fence fence-manager)
if [ -z "${BIN:-}" ]; then
  BIN=$(cargo bench --bench hit_cost --no-run --message-format=json 2>/dev/null \
    | grep -o '"executable":"[^"]*hit_cost[^"]*"' | tail -1 | cut -d'"' -f4)
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
count() { # arm hits -> instructions
  valgrind --tool=callgrind --callgrind-out-file="$out/cg.$1.$2" "$BIN" \
    --arms "$1" --hits "$2" --warm 500 --conc "${CONC:-1}" >/dev/null 2>"$out/log.$1.$2"
  grep -o 'Collected : [0-9]*' "$out/log.$1.$2" | grep -o '[0-9]*$'
}
for arm in "${arms[@]}"; do
  small=$(count "$arm" 2000)
  large=$(count "$arm" 12000)
  echo "$arm: $(( (large - small) / 10000 )) instructions per hit"
done
