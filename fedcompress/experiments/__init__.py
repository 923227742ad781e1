"""``fedcompress compare`` without --compressors: the results tables (docs/results.md), re-measured.

Settings (``plan.SETTINGS``): mnist5k with 10 clients of ~500 images (iid and Dirichlet 0.3),
Fashion-MNIST with 60 clients of 1,000 images, and the paper's 60-client mnist5k as a labelled extra;
each runs for as many rounds as ``none`` needs to plateau. Rows (``plan.ROWS``): none, fp16, mask,
sz, sz with error feedback, FedSynth with fixed and with trainable labels and sent at 1/2 resolution
(alone and with error feedback from 32x, with 30 outer steps as well at 64x; ``plan.ROW_BUDGETS``),
and the controls "real subset" at full and at 1/2 resolution (FedSynth's payload shape filled with
the client's own samples, not optimised), at byte budgets 8x .. 256x through each compressor's own
``ratio=R`` key (every upload <= dense / R), plus FedSZ's REL sweep (1e-1 .. 1e-4, on updates and on weights).

With several seeds (``--seeds 0,1,2``) every run happens once per seed (the seed fixes the split, the
client sampling and the model init, the same for every row) and the tables show mean ± sample std;
goals are judged on the mean. Each setting has a second table: the same cells as the mean over each
run's last ``LAST_ROUNDS`` rounds (steadier where a row swings from round to round). Every run
writes ``<runs>/seed<S>/<setting>/<spec>/summary.json`` and ``metrics.jsonl``; a run whose summary
has the same config is reused, so ``--parts`` regenerates one part and a report can be rewritten
from the cache (``--cached-only``). Each finished run is also archived as one compact JSON
(``--archive``, default ``<report dir>/runs``), read where the cache lacks it (``cache.py``).

Modules, in pipeline order: ``plan`` (what runs), ``cache`` (the run cache and running what it
lacks), ``summary`` (mean over seeds, the machine line), ``tables`` and ``plots`` (the report's
pieces), ``report`` (all of it: ``run_results``). The command-line options live in
``fedcompress.cli``; the bench table in ``fedcompress.benchtable``.
"""

from .cache import execute, load_cached, run_dir
from .plan import (
    BUDGETS,
    ROW_LABELS,
    ROWS,
    SETTINGS,
    SWEEP_REL,
    Plan,
    Run,
    Setting,
    build_runs,
    compressor_available,
    config,
)  # fmt: skip
from .report import report, run_results
from .summary import (
    LAST_ROUNDS,
    last_rounds_accuracy,
    machine_info,
    machine_line,
    mean_std,
    mean_summary,
    merge_seeds,
)  # fmt: skip
from .tables import iso_ratio, setting_table, sweep_table

__all__ = [
    "BUDGETS", "LAST_ROUNDS", "ROWS", "ROW_LABELS", "SETTINGS", "SWEEP_REL", "Plan", "Run", "Setting", "build_runs",
    "compressor_available", "config", "execute", "iso_ratio", "last_rounds_accuracy", "load_cached", "machine_info",
    "machine_line",
    "mean_std", "mean_summary", "merge_seeds", "report", "run_dir", "run_results", "setting_table", "sweep_table",
]  # fmt: skip
