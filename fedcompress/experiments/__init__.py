"""``fedcompress results`` (also ``compare`` without --compressors): the papers' tables, re-measured.

``results`` reproduces the shape of FedSynth's Table 1 (rows none, mask, sz, fedsynth with fixed and
trainable labels, each at matched upstream ratios ~8x, 16x, 64x) and FedSZ's REL sweep (1e-1 .. 1e-4,
on updates and on weights), on an iid split and on a Dirichlet(0.3) split, with the FedAvg driver
``fedcompress.fedavg.run_experiment`` (same seed, split, rounds and model init for every row).
Parameters are chosen to land on each ratio:

* mask: ``keep = 1 / ratio``;
* sz: the REL error bound found by bisection (in log space) on one real update (client 0's first
  local SGD update from the initial model) so that ``len(none payload) / len(sz payload)`` is near
  the ratio; weights-target rows are calibrated on the client's weights;
* fedsynth: the (batches, batch) pair whose payload length, computed by compressing a synthetic set
  of that shape, puts ``dense / payload`` nearest the ratio.

With several seeds (``--seeds 0,1,2``) every row runs once per seed (the seed fixes the split, the
client sampling and the model init, the same for every row), with the parameters calibrated on the
first seed, and the tables show the mean over seeds ± the sample standard deviation (``mean_std``);
goals are judged on the mean. Every run writes ``<runs>/seed<S>/<partition>/<name>/summary.json``
and ``metrics.jsonl``; a run whose summary exists with the same config and spec is reused, so the
report can be regenerated (e.g. when a compressor lands or a seed is added) without re-running the
rest. The ratio printed is the one the run reached. The report goes to ``--report-dir`` (default:
the run cache folder, under runs/); the project's docs/ are written only when asked
(``--report-dir docs``).

Modules, in pipeline order: ``plan`` (what runs), ``calibrate`` (parameters per ratio), ``cache``
(the run cache and running what it lacks), ``summary`` (mean over seeds, the machine line),
``tables`` and ``plots`` (the report's pieces), ``report`` (all of it: ``run_results``). The
command-line options live in ``fedcompress.cli``; the bench table in ``fedcompress.benchtable``.
"""

from .cache import execute, load_cached
from .calibrate import build_runs, calibrate_sz, fedsynth_shape, first_update
from .plan import RATIOS, ROW_LABELS, SWEEP_REL, Plan, Run, compressor_available
from .report import report, run_results
from .summary import machine_info, machine_line, mean_std, mean_summary, merge_seeds
from .tables import goal_lines, sweep_table, table1

__all__ = [
    "RATIOS", "ROW_LABELS", "SWEEP_REL", "Plan", "Run", "build_runs", "calibrate_sz", "compressor_available",
    "execute", "fedsynth_shape", "first_update", "goal_lines", "load_cached", "machine_info", "machine_line",
    "mean_std", "mean_summary", "merge_seeds", "report", "run_results", "sweep_table", "table1",
]  # fmt: skip
