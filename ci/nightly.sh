#!/usr/bin/env bash
# The nightly benchmark, one stage per workflow step (.github/workflows/nightly.yml), runnable by hand:
#
#   ci/nightly.sh install    a virtual environment with bench in it (pip's cache on the runner: no re-download)
#   ci/nightly.sh previous   the earlier nights' results, to judge tonight by (see "Where the earlier nights
#                            come from" below); none means a first night
#   ci/nightly.sh run        bench run on each nightly suite into a fresh results folder
#   ci/nightly.sh report     one report per suite, --fail-on-regression: each config against its own history
#                            when the suite has five earlier nights, else against the previous night (bench
#                            report's rules, see the README); writes the summary into $GITHUB_STEP_SUMMARY, and
#                            history/ (the newest HISTORY_RUNS nights with tonight's) for the next night; exits 1
#                            on a regression
#   ci/nightly.sh all        the four in turn
#
# Settings (environment):
#   BENCH_NIGHTLY_DIR        work folder (default: $RUNNER_TEMP/bench-nightly, else ./nightly); holds results/,
#                            previous/, view/, reports/ and history/, all rebuilt each night
#   BENCH_CACHE              persistent cache on the runner (default: ~/.cache/bench-nightly): datasets
#                            (BENCH_DATA), weights (TORCH_HOME, HF_HOME), pip's downloads
#   BENCH_NIGHTLY_SUITES     suite files, space-separated (default: suites/throughput.yaml suites/cifar_full.yaml)
#   BENCH_NIGHTLY_ONLY       --only filter for every suite (default: none)
#   BENCH_NIGHTLY_MAX_CELLS  --max-cells cap per suite (default: none)
#   BENCH_NIGHTLY_ARGS       more `bench run` arguments, word-split (e.g. "--set epochs=1"; default: none)
#   BENCH_HISTORY            optional long-lived results folder on the runner: each night's rows are copied in
#                            and compacted; outside GitHub Actions, where the earlier nights come from
#   BENCH                    the bench command (default: the one `install` made, else `bench` on PATH)
#
# Where the earlier nights come from, first match wins:
#   BENCH_PREVIOUS_RESULTS   a local folder holding a results folder (tests, or a night re-run by hand)
#   BENCH_PREVIOUS_RUN_ID    a workflow run id, pinned: its nightly-results artifact alone, so tonight is compared
#                            with that one night, and the history starts again from it (accepting a change)
#   in GitHub Actions        the nightly-history artifact (the newest HISTORY_RUNS nights that passed) of the
#                            newest successful scheduled run of this workflow (`gh run list`); its nightly-results
#                            when it has none (a night from before the history artifact)
#   BENCH_HISTORY            by hand: the newest HISTORY_RUNS runs of each suite in it (every night run, passed or
#                            not; to accept a change, point BENCH_PREVIOUS_RESULTS at a night with the new numbers)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${BENCH_NIGHTLY_DIR:-${RUNNER_TEMP:-$ROOT}/bench-nightly}"
CACHE="${BENCH_CACHE:-$HOME/.cache/bench-nightly}"
SUITES="${BENCH_NIGHTLY_SUITES:-suites/throughput.yaml suites/cifar_full.yaml}"
ARTIFACT="nightly-results"
HISTORY_ARTIFACT="nightly-history"
HISTORY_RUNS=30  # nights kept per suite: the window bench report judges a config's history by (history.WINDOW)

export BENCH_DATA="${BENCH_DATA:-$CACHE/data}"
export TORCH_HOME="${TORCH_HOME:-$CACHE/torch}"
export HF_HOME="${HF_HOME:-$CACHE/huggingface}"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$CACHE/pip}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

say() { echo "nightly: $*"; }
summary() { if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then cat >> "$GITHUB_STEP_SUMMARY"; else cat > /dev/null; fi; }

bench_cmd() {
  if [ -n "${BENCH:-}" ]; then echo "$BENCH"
  elif [ -x "$WORK/venv/bin/bench" ]; then echo "$WORK/venv/bin/bench"
  else command -v bench || { echo "nightly: no bench found; run 'ci/nightly.sh install' or set BENCH" >&2; exit 2; }
  fi
}

suite_name() {  # the `name:` a suite file gives its results folder
  sed -n 's/^name:[[:space:]]*\([A-Za-z0-9_.-]*\).*/\1/p' "$1" | head -n 1
}

install() {
  mkdir -p "$CACHE" "$BENCH_DATA" "$TORCH_HOME" "$HF_HOME" "$PIP_CACHE_DIR"
  python3 -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q --upgrade pip
  "$WORK/venv/bin/pip" install -q -e "${ROOT}[timm]"
  "$WORK/venv/bin/bench" env
}

previous() {
  rm -rf "$WORK/previous"
  mkdir -p "$WORK/previous"
  if [ -n "${BENCH_PREVIOUS_RESULTS:-}" ]; then
    say "previous results from $BENCH_PREVIOUS_RESULTS"
    if [ -d "$BENCH_PREVIOUS_RESULTS" ]; then cp -R "$BENCH_PREVIOUS_RESULTS/." "$WORK/previous/"; fi
  elif [ -n "${BENCH_PREVIOUS_RUN_ID:-}" ]; then
    say "baseline pinned to workflow run $BENCH_PREVIOUS_RUN_ID: tonight is compared with that night alone"
    fetch_artifact "$ARTIFACT"
  elif [ -n "${GITHUB_ACTIONS:-}" ]; then
    fetch_artifact "$HISTORY_ARTIFACT" || fetch_artifact "$ARTIFACT"
  elif [ -n "${BENCH_HISTORY:-}" ] && [ -d "$BENCH_HISTORY" ]; then
    say "earlier nights from BENCH_HISTORY ($BENCH_HISTORY): the newest $HISTORY_RUNS runs of each suite"
    newest_runs "$BENCH_HISTORY" "$WORK/previous"
  else
    say "no previous results given (BENCH_PREVIOUS_RESULTS): a first night"
  fi
  local files runs
  files=$(find "$WORK/previous" -name '*.parquet' -path '*/cells/*' | wc -l)
  runs=$(for dir in "$WORK/previous"/*/cells; do [ -d "$dir" ] && run_ids "$dir"; done | sort -u | grep -c . || true)
  say "previous nights: $runs runs, $files cell files"
}

run_ids() {  # the run ids of a cells/ folder, oldest first: CELL--RUN.parquet and compacted RUN.run.parquet
  find "$1" -maxdepth 1 -name '*.parquet' | sed -E 's#.*/##; s/\.run\.parquet$//; s/^.*--//; s/\.parquet$//' | sort -u
}

newest_runs() {  # copy each suite's newest HISTORY_RUNS runs (cells and epochs) from $1 into $2
  local src="$1" dst="$2" dir suite run kind
  for dir in "$src"/*/cells; do
    [ -d "$dir" ] || continue
    suite=$(basename "$(dirname "$dir")")
    for run in $(run_ids "$dir" | tail -n "$HISTORY_RUNS"); do  # run ids start with their UTC start time
      for kind in cells epochs; do
        [ -d "$src/$suite/$kind" ] || continue
        mkdir -p "$dst/$suite/$kind"
        find "$src/$suite/$kind" -maxdepth 1 \( -name "*--$run.parquet" -o -name "$run.run.parquet" \) \
          -exec cp {} "$dst/$suite/$kind/" \;
      done
    done
  done
}

fetch_artifact() {  # $1: the artifact to download into previous/; returns 1 when this run has none
  command -v gh >/dev/null || { echo "nightly: the GitHub CLI (gh) is not on this runner; install it (see README)" >&2; exit 2; }
  local name="$1" run="${BENCH_PREVIOUS_RUN_ID:-}"
  if [ -z "$run" ]; then
    # The newest successful scheduled run of this workflow: the last night that passed.
    run=$(gh run list --repo "$GITHUB_REPOSITORY" --workflow "${NIGHTLY_WORKFLOW:-nightly.yml}" --event schedule \
          --status success --limit 1 --json databaseId --jq '.[0].databaseId // empty') ||
      { echo "nightly: gh run list failed; check the workflow's token (actions: read)" >&2; exit 2; }
  fi
  if [ -z "$run" ]; then
    say "no earlier successful scheduled night of this workflow: a first night"
    return
  fi
  say "previous results: artifact $name of workflow run $run"
  if ! gh run download "$run" --repo "${GITHUB_REPOSITORY:?}" --name "$name" --dir "$WORK/previous"; then
    if [ "$name" = "$HISTORY_ARTIFACT" ]; then
      say "run $run has no $name artifact (a night from before it): its $ARTIFACT instead"
      return 1
    fi
    echo "nightly: could not download $name of run $run (expired, or never uploaded); set the" \
         "BENCH_BASELINE_RUN variable to a run that has it, or delete it to compare with the last good night" >&2
    exit 2
  fi
}

run_suites() {
  local bench suite
  local args=()
  bench=$(bench_cmd)
  rm -rf "$WORK/results"
  mkdir -p "$WORK/results"
  [ -n "${BENCH_NIGHTLY_ONLY:-}" ] && args+=(--only "$BENCH_NIGHTLY_ONLY")
  [ -n "${BENCH_NIGHTLY_MAX_CELLS:-}" ] && args+=(--max-cells "$BENCH_NIGHTLY_MAX_CELLS")
  # shellcheck disable=SC2206  # word-splitting is the point: extra arguments as one string
  [ -n "${BENCH_NIGHTLY_ARGS:-}" ] && args+=(${BENCH_NIGHTLY_ARGS})
  local status=0
  for suite in $SUITES; do  # one suite failing to start does not keep the others from running
    say "bench run $suite ${args[*]}"
    (cd "$ROOT" && "$bench" run "$suite" --results "$WORK/results" "${args[@]}") || status=$?
  done
  return "$status"
}

report() {
  local bench status=0 suite name runs code
  local run_args=()
  bench=$(bench_cmd)
  rm -rf "$WORK/view" "$WORK/reports" "$WORK/history"
  mkdir -p "$WORK/view" "$WORK/reports" "$WORK/history"
  # The report reads one folder: tonight's rows and the earlier nights' side by side (copies, so the uploaded
  # results folder stays tonight's alone; the history artifact keeps the newest HISTORY_RUNS nights, no more).
  cp -R "$WORK/previous/." "$WORK/view/" 2>/dev/null || true
  cp -R "$WORK/results/." "$WORK/view/"
  local first=1
  [ -n "$(find "$WORK/previous" -name '*.parquet' -path '*/cells/*' -print -quit)" ] && first=0
  {
    echo "# bench nightly, $(date -u +%Y-%m-%d)"
    echo
    if [ "$first" = 1 ]; then
      echo "**First night: no previous results to compare with, so nothing can regress.** Tonight's results are the next night's baseline."
      echo
    fi
  } | summary
  [ "$first" = 1 ] && say "first night: no previous results to compare with; the reports show tonight's rows alone"
  for suite in $SUITES; do
    name=$(suite_name "$ROOT/$suite")
    if [ ! -d "$WORK/results/$name/cells" ]; then
      say "$suite: no results tonight"
      printf '## %s\n\nNo results tonight.\n\n' "$name" | summary
      status=1
      continue
    fi
    # Tonight's run of the suite (its cell files, or the one file `bench run` folded them into): shown alone and
    # judged against the earlier runs in the view, their history when there are five of them.
    runs=$(run_ids "$WORK/results/$name/cells")
    run_args=()
    if [ "$(printf '%s\n' "$runs" | grep -c .)" = 1 ]; then run_args=(--run "$runs"); fi
    code=0
    "$bench" report --results "$WORK/view" --out "$WORK/reports/$name" --suite "$name" "${run_args[@]}" \
      --fail-on-regression > "$WORK/reports/$name.out" 2>&1 || code=$?
    cat "$WORK/reports/$name.out"
    summarise_suite "$name" "$code"
    if [ "$code" = 1 ]; then
      say "$name: REGRESSION against the earlier nights (see above)"; status=1
    elif [ "$code" != 0 ]; then
      say "$name: bench report failed (exit $code)"; status=1
    else
      say "$name: no regression"
    fi
  done
  # The next night's history: the newest HISTORY_RUNS nights with tonight's (a night that fails is never
  # fetched as one: the next night takes the artifact of the newest night that passed).
  newest_runs "$WORK/view" "$WORK/history"
  "$bench" compact --results "$WORK/history" > /dev/null || say "could not compact the history (uploaded as it is)"
  keep_history
  return "$status"
}

summarise_suite() {  # the suite's regressions, then its leaderboard (plots dropped: they are in the artifact)
  local name="$1" code="$2" md="$WORK/reports/$1/leaderboard.md"
  {
    echo "## $name"
    echo
    # How many configs were compared, and by which rule (a history of nights, or the previous night alone).
    sed -n 's/^comparison: /**Compared:** /p' "$WORK/reports/$name.out"
    echo
    if [ "$code" = 1 ]; then
      echo "**Regressions against the earlier nights:**"
      echo
      sed -n 's/^regression: /- /p' "$WORK/reports/$name.out"
      echo
    elif [ "$code" != 0 ]; then
      echo "**bench report failed (exit $code):**"
      echo
      echo '```'
      tail -n 20 "$WORK/reports/$name.out"
      echo '```'
    fi
    # A step summary holds at most 1 MiB: keep each suite's share well under it.
    if [ -f "$md" ]; then grep -v '^!\[' "$md" | head -c 400000; echo; fi
  } | summary
}

keep_history() {
  [ -n "${BENCH_HISTORY:-}" ] || return 0
  local bench
  bench=$(bench_cmd)
  mkdir -p "$BENCH_HISTORY"
  cp -R "$WORK/results/." "$BENCH_HISTORY/"
  "$bench" compact --results "$BENCH_HISTORY" || say "could not compact $BENCH_HISTORY (left as it is)"
}

main() {
  mkdir -p "$WORK"
  case "${1:-}" in
    install) install ;;
    previous) previous ;;
    run) run_suites ;;
    report) report ;;
    all) install && previous && run_suites && report ;;
    *) echo "usage: ci/nightly.sh install|previous|run|report|all" >&2; exit 2 ;;
  esac
}

main "$@"
