"""The one table of a run directory's file names (README, "Output"), for every module that
writes or reads them: the engine, tune/ and analysis/. Trial files are relative to the
trial's directory (RUN_DIR/<trial>/), run files to the run directory.
"""

# -- the run directory --------------------------------------------------------------------------
RUN_CONFIG_FILE = "run_config.json"  # every flag, the trials, the resources, the data
PLAN_FILE = "plan.json"  # --plan-only's plan
FINAL_SUMMARY_FILE = "final_summary.json"  # the cross-backbone summary
SUMMARY_CSV_FILE = "summary.csv"  # its table, one row a trial (and the same as Parquet)
SUMMARY_PARQUET_FILE = "summary.parquet"
EVALUATION_DIR = "evaluation"  # the closing evaluation's report and files
TRAINING_CURVES_FILE = "training_curves.png"
DATASET_LISTING_FILE = "dataset_listing.json"  # a bucket dataset's objects: what nodes check

# -- each trial's directory ---------------------------------------------------------------------
EPOCH_LOG = "logs/epoch_metrics.csv"  # a row here means the epoch is safe
BATCH_LOG = "logs/batch_metrics.csv"
INFO_FILE = "logs/training_info.json"
PROGRESS_FILE = "logs/progress.json"  # the newest batch: epoch, batch, loss, wall time
ERROR_FILE = "logs/error.txt"  # Tune's full error text, beside our logs
FAILURES_FILE = "logs/failures.json"  # one entry per failed attempt
CHECKPOINT_DIR = "checkpoints"
BEST_LOSS_FILE = "checkpoints/best_model.pth"  # the seed's: the lowest training loss
BEST_MAP_FILE = "checkpoints/best_map_model.pth"  # ours: the highest test mAP


def final_checkpoint(backbone: str) -> str:
    return f"{CHECKPOINT_DIR}/{backbone}_final.pth"


def final_complete_checkpoint(backbone: str) -> str:
    return f"{CHECKPOINT_DIR}/{backbone}_final_complete.pth"
