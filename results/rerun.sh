#!/usr/bin/env bash
# Re-runs, or resumes, the comparisons whose tables the documentation shows, with the current code.
#
#   bash results/rerun.sh [FOLDER ...]      from the repository root; default: every folder below
#   RESULTS=DIR bash results/rerun.sh ...   writes DIR/FOLDER instead of results/FOLDER (a fresh re-run)
#
# Every command is resumable (--resume): finished runs are kept, an interrupted run continues from
# its last saved state (results/<folder>/checkpoints/, not committed), the others start. Two runs at
# a time (--jobs=2), one torch thread each. The Scientific files download themselves on first use
# (or: python -m recbole_iisan.prepare --dataset Scientific --raw_dir DIR_WITH_THE_TSVS).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
RESULTS=${RESULTS:-results}
SEEDS=2020,2021,2022
FOUR=SASRec,GRU4Rec,IISANVS,IISANVA

run() {  # run FOLDER ARGS...
  local folder=$1; shift
  echo "== $RESULTS/$folder"
  python run_recbole_iisan.py "$@" --seeds=$SEEDS --results_dir="$RESULTS/$folder" --jobs=2 --resume
}

folders=("$@")
[ ${#folders[@]} -eq 0 ] && folders=(scientific_paper_protocol scientific scientific_item_id)
for f in "${folders[@]}"; do
  case $f in
    scientific_paper_protocol) run "$f" --dataset=Scientific --paper_protocol --compare=$FOUR --epochs=100 ;;
    # item_id_embedding=False: the committed runs are content-only IISAN (the default of the commit that
    # wrote them; the default is now True under RecBole's protocol, which scientific_item_id measured)
    scientific)                run "$f" --dataset=Scientific --compare=$FOUR --epochs=100 --item_id_embedding=False ;;
    scientific_item_id)
      # the arm without the ID embedding is the scientific folder's IISANVS: the same command, config and seeds
      mkdir -p "$RESULTS/$f"
      for s in ${SEEDS//,/ }; do
        for ext in json users.csv; do
          src="$RESULTS/scientific/IISANVS-seed$s.$ext"
          [ -f "$src" ] && [ ! -f "$RESULTS/$f/IISANVS-seed$s.$ext" ] && cp "$src" "$RESULTS/$f/"
        done
      done
      run "$f" --dataset=Scientific --compare="IISANVS,IISANVS[item_id_embedding=True]" --epochs=100 --item_id_embedding=False ;;
    *) echo "error: unknown results folder '$f' (scientific_paper_protocol, scientific, scientific_item_id)" >&2; exit 2 ;;
  esac
done
