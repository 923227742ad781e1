"""FedAvg experiments: datasets and partitions (data), models, the driver, plots.

from fedcompress.fedavg import ExperimentConfig, run_experiment
summary = run_experiment(ExperimentConfig(dataset="digits", model="mlp", rounds=2))
"""

from .data import DATASETS, PARTITIONS, DatasetInfo, FederatedDataset, load_dataset, make_partitions
from .driver import ExperimentConfig, evaluate, run_experiment, sample_clients, weighted_average
from .models import MODELS, build_model, count_parameters

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "MODELS",
    "DatasetInfo",
    "FederatedDataset",
    "ExperimentConfig",
    "load_dataset",
    "make_partitions",
    "build_model",
    "count_parameters",
    "run_experiment",
    "evaluate",
    "sample_clients",
    "weighted_average",
]
