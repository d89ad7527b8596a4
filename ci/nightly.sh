#!/usr/bin/env bash
# The nightly benchmark, one stage per workflow step (.github/workflows/nightly.yml), runnable by hand:
#
#   ci/nightly.sh install    a virtual environment with bench in it (pip's cache on the runner: no re-download)
#   ci/nightly.sh previous   the previous night's results folder, to compare with (see "Where the previous
#                            night comes from" below); none means a first night
#   ci/nightly.sh run        bench run on each nightly suite into a fresh results folder
#   ci/nightly.sh report     one report per suite, compared with the previous night, --fail-on-regression;
#                            writes the summary into $GITHUB_STEP_SUMMARY; exits 1 on a regression
#   ci/nightly.sh all        the four in turn
#
# Settings (environment):
#   BENCH_NIGHTLY_DIR        work folder (default: $RUNNER_TEMP/bench-nightly, else ./nightly); holds results/,
#                            previous/, view/ and reports/, all rebuilt each night
#   BENCH_CACHE              persistent cache on the runner (default: ~/.cache/bench-nightly): datasets
#                            (BENCH_DATA), weights (TORCH_HOME, HF_HOME), pip's downloads
#   BENCH_NIGHTLY_SUITES     suite files, space-separated (default: suites/throughput.yaml suites/cifar_full.yaml)
#   BENCH_NIGHTLY_ONLY       --only filter for every suite (default: none)
#   BENCH_NIGHTLY_MAX_CELLS  --max-cells cap per suite (default: none)
#   BENCH_NIGHTLY_ARGS       more `bench run` arguments, word-split (e.g. "--set epochs=1"; default: none)
#   BENCH_HISTORY            optional long-lived results folder: each night's rows are copied in and compacted
#   BENCH                    the bench command (default: the one `install` made, else `bench` on PATH)
#
# Where the previous night comes from, first match wins:
#   BENCH_PREVIOUS_RESULTS   a local folder holding a results folder (tests, or a night re-run by hand)
#   BENCH_PREVIOUS_RUN_ID    a workflow run id: `gh run download` of its nightly-results artifact
#   otherwise, in GitHub Actions: the newest successful scheduled run of this workflow (`gh run list`)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${BENCH_NIGHTLY_DIR:-${RUNNER_TEMP:-$ROOT}/bench-nightly}"
CACHE="${BENCH_CACHE:-$HOME/.cache/bench-nightly}"
SUITES="${BENCH_NIGHTLY_SUITES:-suites/throughput.yaml suites/cifar_full.yaml}"
ARTIFACT="nightly-results"

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
  elif [ -n "${BENCH_PREVIOUS_RUN_ID:-}" ] || [ -n "${GITHUB_ACTIONS:-}" ]; then
    fetch_artifact
  else
    say "no previous results given (BENCH_PREVIOUS_RESULTS): a first night"
  fi
  local files
  files=$(find "$WORK/previous" -name '*.parquet' -path '*/cells/*' | wc -l)
  say "previous night: $files cell files"
}

fetch_artifact() {
  command -v gh >/dev/null || { echo "nightly: the GitHub CLI (gh) is not on this runner; install it (see README)" >&2; exit 2; }
  local run="${BENCH_PREVIOUS_RUN_ID:-}"
  if [ -z "$run" ]; then
    # The newest successful scheduled run of this workflow: the last night that passed.
    run=$(gh run list --repo "$GITHUB_REPOSITORY" --workflow "${NIGHTLY_WORKFLOW:-nightly.yml}" --event schedule \
          --status success --limit 1 --json databaseId --jq '.[0].databaseId // empty')
  fi
  if [ -z "$run" ]; then
    say "no earlier successful scheduled night of this workflow: a first night"
    return
  fi
  say "previous results: artifact $ARTIFACT of workflow run $run"
  if ! gh run download "$run" --repo "${GITHUB_REPOSITORY:?}" --name "$ARTIFACT" --dir "$WORK/previous"; then
    echo "nightly: could not download $ARTIFACT of run $run (expired, or never uploaded); set the" \
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
  rm -rf "$WORK/view" "$WORK/reports"
  mkdir -p "$WORK/view" "$WORK/reports"
  # The report reads one folder: tonight's rows and the previous night's side by side (copies, so the uploaded
  # results folder stays tonight's alone and artifacts do not grow night after night).
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
    # Tonight's run of the suite: shown alone, compared with the newest earlier run (the previous night's).
    runs=$(find "$WORK/results/$name/cells" -name '*--*.parquet' | sed 's/.*--//; s/\.parquet$//' | sort -u)
    run_args=()
    if [ "$(printf '%s\n' "$runs" | grep -c .)" = 1 ]; then run_args=(--run "$runs"); fi
    code=0
    "$bench" report --results "$WORK/view" --out "$WORK/reports/$name" --suite "$name" "${run_args[@]}" \
      --fail-on-regression > "$WORK/reports/$name.out" 2>&1 || code=$?
    cat "$WORK/reports/$name.out"
    summarise_suite "$name" "$code"
    if [ "$code" = 1 ]; then
      say "$name: REGRESSION against the previous night (see above)"; status=1
    elif [ "$code" != 0 ]; then
      say "$name: bench report failed (exit $code)"; status=1
    else
      say "$name: no regression"
    fi
  done
  keep_history
  return "$status"
}

summarise_suite() {  # the suite's regressions, then its leaderboard (plots dropped: they are in the artifact)
  local name="$1" code="$2" md="$WORK/reports/$1/leaderboard.md"
  {
    echo "## $name"
    echo
    if [ "$code" = 1 ]; then
      echo "**Regressions against the previous night:**"
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
