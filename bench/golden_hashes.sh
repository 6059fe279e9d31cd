#!/usr/bin/env bash
# Content hashes of every engine output for fixed inputs: run before and after a change to show that the bytes
# written by extract / prune / amplify / merge / apply did not change.
#   bash bench/golden_hashes.sh [OUT_DIR]   (default bench/out/golden; builds a 20M fp32 and a bf16 synthetic checkpoint)
set -euo pipefail
out=${1:-bench/out/golden}
mkdir -p "$out"
py=${PYTHON:-python}
for dt in fp32 bf16; do
  syn="$out/syn-20m-$dt"
  [ -d "$syn" ] || $py bench/make_synthetic.py "$syn" --params 20M --dtype $dt --finetunes 2 --seed 0 >/dev/null
  w="$out/work-$dt"; rm -rf "$w"; mkdir -p "$w"
  for ft in ft1 ft2; do $py -m dppa extract "$syn/base" "$syn/$ft" -o "$w/d-$ft" -q >/dev/null; done
  $py -m dppa prune "$w/d-ft1" -o "$w/p-mag" --method magnitude --density 0.2 -q >/dev/null
  $py -m dppa prune "$w/d-ft1" -o "$w/p-dare" --method dare --density 0.2 --seed 3 -q >/dev/null
  $py -m dppa prune "$w/d-ft1" -o "$w/p-dp" --method dp --density 0.2 -q >/dev/null
  $py -m dppa prune "$w/d-ft2" -o "$w/p-dp2" --method dp --density 0.1 -q >/dev/null
  $py -m dppa amplify "$w/d-ft1" -o "$w/a-ft1" --densities 0.1,0.2 --factors 1.8,1.0 -q >/dev/null
  $py -m dppa amplify "$w/d-ft2" -o "$w/a-ft2" --densities 0.05,0.1,0.2 --factors 1.2,1.5,0.9 --combine band -q >/dev/null
  $py -m dppa merge "$syn/base" "$w/d-ft1" "$w/d-ft2" -o "$w/m-ties" --method ties --density 0.2 -q >/dev/null
  $py -m dppa merge "$syn/base" "$w/d-ft1" "$w/d-ft2" -o "$w/m-ta" --method task_arithmetic --weights 0.7,0.4 --scale 0.8 -q >/dev/null
  $py -m dppa merge "$syn/base" "$w/a-ft1" "$w/a-ft2" -o "$w/m-dppa" --method ties -q >/dev/null
  $py -m dppa apply "$syn/base" "$w/p-dp" -o "$w/apply-dp" -q >/dev/null
  for d in "$w"/*/; do
    printf '%s %s\n' "$dt/$(basename "$d")" "$($py -c 'import json,sys; print(json.load(open(sys.argv[1]))["content_hash"])' "$d/dppa_manifest.json")"
  done
done
